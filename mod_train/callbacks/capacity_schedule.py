"""The MoD capacity schedule (``model.mod.capacity_schedule``): a MoD twin upcycled from a dense
model starts with every token routed (capacity 1.0: the dense computation) and its layers learn to
skip gradually. Over the first ``steps`` training steps the capacity falls in ``phases`` equal
phases from 1.0 towards each layer's target; within a phase k is static (one top-k size, one
threshold target for the causal calibration, which observes the share k/s it is given); from step
``steps + 1`` on the target holds. The capacity is a function of the step alone, so a resumed run
continues the schedule exactly.
"""

from __future__ import annotations

from typing import Iterable, List

import torch

from mod_train.callbacks.base import Callback
from mod_train.checkpoint.state import TrainState
from mod_train.model.mod import mod_layers_of


def scheduled_capacity(target: float, step: int, steps: int, phases: int) -> float:
    """Capacity of a layer with ``target`` during training step ``step`` (1-based)."""
    if steps <= 0 or step > steps:
        return target
    phase = (step - 1) * phases // steps  # 0 .. phases-1
    return 1.0 - (1.0 - target) * phase / phases


class CapacityScheduleCallback(Callback):
    def __init__(self, modules: Iterable[torch.nn.Module], schedule) -> None:
        self.layers = mod_layers_of(modules)
        self.targets: List[float] = [layer.capacity for layer in self.layers]  # built from the config
        self.steps, self.phases = int(schedule.steps), int(schedule.phases)

    def apply(self, step: int) -> None:
        for layer, target in zip(self.layers, self.targets):
            layer.set_capacity(scheduled_capacity(target, step, self.steps, self.phases))

    def on_step_begin(self, state: TrainState) -> None:
        self.apply(state.step + 1)

    def on_restore(self, state: TrainState) -> None:
        self.apply(state.step + 1)
