"""Collect per-layer routing statistics (MoD, MoE) from the model's modules for logging.

Layers that route tokens are ``RoutingStatsSource``s (routing_stats.py): the recorder connects
itself to each of them as their sink, they publish every forward pass's statistics into it, and
it averages them over the micro-batches of a step and over the data-parallel ranks (so rank 0
logs global statistics, e.g. MoE expert loads). One direction only: nothing flows back into the
layers. No global state: the recorder owns the accumulation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List

import torch

from mod_train.model.routing_stats import RoutingStatsSource


def _data_parallel_group():
    """megatron's data-parallel group when there is more than one DP rank, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None


class AuxLossRecorder:
    def __init__(self, chunks: Iterable[torch.nn.Module] = ()):
        self.layers: List[RoutingStatsSource] = [m for c in chunks for m in c.modules()
                                                 if isinstance(m, RoutingStatsSource)]
        for m in self.layers:
            m.connect_stats_sink(self)
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
