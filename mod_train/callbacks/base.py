"""The hooks of the training loop. A callback overrides the ones it needs; every rank calls every
hook at the same point (so a hook may run collectives), and only the main rank writes files."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List

from mod_train.checkpoint.state import TrainState


class Callback:
    def on_step_begin(self, state: TrainState) -> None:
        """Before the step ``state.step + 1`` starts."""

    def on_step(self, state: TrainState, step) -> None:
        """After step ``state.step`` (``step``: its StepMetrics, verdict included)."""

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None:
        """After an evaluation at ``state.step`` (metrics named ``valid ...``)."""

    def on_save(self, state: TrainState, path: Path, last: bool) -> None:
        """After a checkpoint of ``state.step`` was committed; ``last``: the invocation ends here."""

    def on_restore(self, state: TrainState) -> None:
        """The loop continues from a reloaded checkpoint (a rollback) at ``state.step``."""

    def on_stop(self, state: TrainState, reason: str) -> None:
        """The loop ends (max_steps, exit_interval, a signal, or an error): release resources."""


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: List[Callback] = list(callbacks)

    def on_step_begin(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_step_begin(state)

    def on_step(self, state: TrainState, step) -> None:
        for c in self.callbacks:
            c.on_step(state, step)

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_eval(state, metrics)

    def on_save(self, state: TrainState, path: Path, last: bool) -> None:
        for c in self.callbacks:
            c.on_save(state, path, last)

    def on_restore(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_restore(state)

    def on_stop(self, state: TrainState, reason: str) -> None:
        for c in self.callbacks:
            c.on_stop(state, reason)
