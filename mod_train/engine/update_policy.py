"""Whether a step's update is applied: the non-finite guard and the loss-spike detector.

Plain numbers in, a ``Verdict`` out, so the rules are tested without a model. The step runner
asks ``decide`` after the backward pass and before ``engine.step()`` with a ``StepCheck`` that
every rank already agrees on (one all-reduce); the trainer reports the final verdict back through
``settle`` (DeepSpeed may still find an overflow of its own) and acts on rollbacks and on too
many skips in a row.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Collection, Deque, Optional

from mod_train.config.schema import SpikeAction


class Verdict(str, Enum):
    APPLY = "apply"
    SKIP_NONFINITE = "skip: non-finite loss or gradients"
    SKIP_SPIKE = "skip: loss spike"
    ROLLBACK = "rollback: loss spike"
    SKIP_REQUESTED = "skip: requested (train.inject.skip_update_at_step)"

    @property
    def applied(self) -> bool:
        return self is Verdict.APPLY


@dataclass(frozen=True)
class StepCheck:
    """What every rank agreed on about one step before its update."""

    finite: bool  # loss and local gradients finite on every rank
    loss: Optional[float] = None  # the step's mean lm loss (only when the policy needs it)


class SpikeDetector:
    """A loss is a spike when it exceeds the mean of the last ``window`` accepted losses by more
    than ``threshold_sigmas`` standard deviations. Silent until the window is full."""

    def __init__(self, window: int, threshold_sigmas: float) -> None:
        self.threshold_sigmas = threshold_sigmas
        self.history: Deque[float] = deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        if len(self.history) < (self.history.maxlen or 0):
            return False
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return loss > mean + self.threshold_sigmas * max(std, 1e-12)

    def accept(self, loss: float) -> None:
        self.history.append(loss)


class UpdatePolicy:
    """The rules, with their state (spike window, consecutive skips).

    ``skip_nonfinite``: a non-finite loss or gradient skips the update on every rank;
    ``spike``/``spike_action``: the detector and what a spike does (log, skip, rollback);
    ``max_skipped_steps``: consecutive skipped updates after which the run must stop;
    ``skip_steps``: steps whose update is skipped on purpose (test reference runs)."""

    def __init__(self, *, skip_nonfinite: bool = True, spike: Optional[SpikeDetector] = None,
                 spike_action: SpikeAction = SpikeAction.off, max_skipped_steps: int = 10,
                 skip_steps: Collection[int] = ()) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.spike = spike if spike_action != SpikeAction.off else None
        self.spike_action = spike_action
        self.max_skipped_steps = max_skipped_steps
        self.skip_steps = frozenset(skip_steps)
        self.consecutive_skips = 0
        self.spike_seen = False  # the last decided step's loss was a spike (any action)

    @property
    def screens(self) -> bool:
        """Whether steps need a check at all (it costs one small all-reduce and host sync)."""
        return self.skip_nonfinite or self.spike is not None or bool(self.skip_steps)

    @property
    def needs_loss(self) -> bool:
        return self.spike is not None

    def decide(self, step: int, check: StepCheck) -> Verdict:
        self.spike_seen = False
        if not check.finite and self.skip_nonfinite:
            return Verdict.SKIP_NONFINITE
        if step in self.skip_steps:
            return Verdict.SKIP_REQUESTED
        if self.spike is not None and check.loss is not None and math.isfinite(check.loss):
            if self.spike.is_spike(check.loss):
                self.spike_seen = True
                if self.spike_action == SpikeAction.skip:
                    return Verdict.SKIP_SPIKE
                if self.spike_action == SpikeAction.rollback:
                    return Verdict.ROLLBACK
            self.spike.accept(check.loss)  # a logged spike still updates the model: it is history
        return Verdict.APPLY

    def settle(self, verdict: Verdict) -> None:
        """The step's final verdict (after DeepSpeed's own overflow check)."""
        self.consecutive_skips = 0 if verdict.applied else self.consecutive_skips + 1

    @property
    def too_many_skips(self) -> bool:
        return self.consecutive_skips >= self.max_skipped_steps


class TooManySkippedSteps(RuntimeError):
    """Raised by the trainer when ``train.max_skipped_steps`` updates in a row were skipped."""
