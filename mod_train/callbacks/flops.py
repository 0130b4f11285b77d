"""The run's FLOP account: ``state.total_flops`` grows by each interval's steps at the FLOPs per
token they were measured at. Shared by the log line (throughput/MFU) and the checkpoints (the
saved total covers every step up to the checkpoint)."""

from __future__ import annotations

from typing import Callable, Optional

from mod_train.callbacks.base import Callback
from mod_train.checkpoint.state import TrainState


class FlopsAccount(Callback):
    """``flops_per_token``: Megatron-LM's count for the model (integrated MoDE: as if no routing slot
    went to a no-op); ``measured_flops_per_token``: integrated MoDE's count at the no-op share of
    the training passes since the last call (a collective, on every rank), or None where the
    static count is exact."""

    def __init__(self, flops_per_token: float, tokens_per_step: int, state: TrainState,
                 measured_flops_per_token: Optional[Callable[[], Optional[float]]] = None) -> None:
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.measured = measured_flops_per_token
        if state.total_flops is None:  # a checkpoint from before total FLOPs were kept
            state.total_flops = flops_per_token * tokens_per_step * state.step
        self.counted_to_step = state.step

    def charge(self, state: TrainState) -> float:
        """Add the steps since the last call to ``state.total_flops``; return the FLOPs per token
        they were charged at."""
        flops = self.flops_per_token
        if self.measured is not None:
            flops = self.measured() or flops
        state.total_flops += flops * self.tokens_per_step * (state.step - self.counted_to_step)
        self.counted_to_step = state.step
        return flops

    def on_restore(self, state: TrainState) -> None:
        self.counted_to_step = state.step  # the checkpoint's total covers its steps
