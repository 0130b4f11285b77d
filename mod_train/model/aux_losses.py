"""Collect per-layer routing statistics (MoD, MoE) from the model's modules for logging.

Layers that route tokens keep their statistics of the last forward pass in themselves and
expose them through ``routing_stats() -> dict[str, float]``; this walks the model and averages
them over the micro-batches of a step and over the data-parallel ranks (so rank 0 logs global
statistics, e.g. MoE expert loads). No global state: the recorder owns the accumulation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable

import torch


def _data_parallel_group():
    """megatron's data-parallel group when there is more than one DP rank, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None


class AuxLossRecorder:
    def __init__(self, chunks: Iterable[torch.nn.Module] = ()):
        self.layers = [m for c in chunks for m in c.modules() if hasattr(m, "routing_stats")]
        for m in self.layers:
            if hasattr(m, "attach_recorder"):
                m.attach_recorder(self)
        self._sums: Dict[str, float] = defaultdict(float)
        self._counts: Dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def record(self, name: str, value: torch.Tensor) -> None:
        """Called by a routing layer once per forward pass (one micro-batch).

        Values stay tensors on the device: converting here would force a host sync per layer.
        """
        self._sums[name] = self._sums[name] + value.detach()
        self._counts[name] += 1

    def summary(self) -> Dict[str, float]:
        """Per-name means over the micro-batches of the step, averaged over data-parallel ranks
        (one small all-reduce, then one host sync for all names). Every DP rank must call it."""
        if not self._sums:
            return {}
        names = sorted(self._sums)  # the same order on every rank
        values = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float64).reshape(()) / self._counts[k]
                              for k in names])
        group = _data_parallel_group()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(values, group=group)
            values /= dist.get_world_size(group)
        means = dict(zip(names, values.tolist()))
        return {k: means[k] for k in self._sums}

    def set_aux_loss_scale(self, scale: float) -> None:
        """Auxiliary-loss gradients are scaled like the LM loss (1 / micro-batches per step)."""
        for m in self.layers:
            if hasattr(m, "aux_loss_scale"):
                m.aux_loss_scale = scale
