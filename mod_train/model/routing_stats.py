"""The one way routing statistics leave a layer: layers that route tokens are ``RoutingStatsSource``s
and publish each forward pass's statistics to the sink they were connected to (the step's
``AuxLossRecorder``). The flow is one-directional: the recorder never writes into a layer.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional, Protocol

import torch


class StatsSink(Protocol):
    def record(self, name: str, value: torch.Tensor) -> None:
        """Called once per forward pass (one micro-batch) per statistic; values stay on the device."""


class RoutingStatsSource:
    """Mixin of a layer that measures its routing (MoD, MoE). The layer calls ``publish_stats``
    at the end of its forward pass; ``routing_stats()`` returns the last pass's values as floats."""

    # The class-level default is None (immutable); ``connect_stats_sink`` sets it per instance.
    stats_sink: Optional[StatsSink] = None
    last_stats: Mapping[str, torch.Tensor] = MappingProxyType({})

    def connect_stats_sink(self, sink: Optional[StatsSink]) -> None:
        self.stats_sink = sink

    def publish_stats(self, stats: Mapping[str, torch.Tensor]) -> None:
        self.last_stats = dict(stats)
        if self.stats_sink is not None:
            for name, value in stats.items():
                self.stats_sink.record(name, value)

    def routing_stats(self) -> dict:
        return {k: float(v) for k, v in self.last_stats.items()}
