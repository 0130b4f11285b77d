"""Test-only faults (``train.inject.*``, all null in real runs): a NaN or a spiking loss at a
step, a skipped update at a step (the reference a NaN run is compared with), a rank that hangs."""

from __future__ import annotations

import time

from mod_train.config.schema import InjectConfig


class FaultInjector:
    def __init__(self, inject: InjectConfig, rank: int) -> None:
        self.inject = inject
        self.here = inject.ranks is None or rank in inject.ranks
        self.fired: set = set()  # (fault, step): each fault fires once (a rollback repeats step numbers)

    def _fires(self, fault: str, step: int, at) -> bool:
        if not self.here or step != at or (fault, step) in self.fired:
            return False
        self.fired.add((fault, step))
        return True

    @property
    def skip_steps(self) -> frozenset:
        step = self.inject.skip_update_at_step
        return frozenset() if step is None else frozenset([step])

    def loss_factor(self, step: int) -> float:
        """What the loss of ``step`` is multiplied by on this rank (1.0: no fault)."""
        if self._fires("nan", step, self.inject.nan_loss_at_step):
            return float("nan")
        if self._fires("spike", step, self.inject.spike_loss_at_step):
            return self.inject.spike_factor
        return 1.0

    def before_step(self, step: int) -> None:
        if self._fires("hang", step, self.inject.hang_at_step):
            time.sleep(self.inject.hang_s)
