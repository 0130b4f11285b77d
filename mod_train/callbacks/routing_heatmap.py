"""MoE: at each checkpoint a layers x experts heatmap of the routing shares since the last one,
gathered from all ranks (a collective), drawn and logged as an artifact by the main rank."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch

from mod_train.callbacks.base import Callback
from mod_train.checkpoint.state import TrainState
from mod_train.tracking.run_logger import RunLogger


def expert_labels(num_experts: int, noop_columns: int) -> List[str]:
    """Column labels: e0..e{n-1}, then "no-op" (one column) or no-op0.. (integrated MoDE)."""
    noops = ["no-op"] if noop_columns == 1 else [f"no-op{j}" for j in range(noop_columns)]
    return [f"e{i}" for i in range(num_experts)] + noops


class RoutingHeatmap(Callback):
    def __init__(self, chunks: Sequence[torch.nn.Module], num_layers: int, labels: List[str],
                 device: torch.device, run_dir: Path, run_logger: RunLogger, is_main: bool) -> None:
        self.chunks = chunks
        self.num_layers = num_layers
        self.labels = labels
        self.device = device
        self.run_dir = Path(run_dir)
        self.run_logger = run_logger
        self.is_main = is_main

    def on_save(self, state: TrainState, path: Path, last: bool) -> None:
        from mod_train.model.moe import gather_routing_loads
        from mod_train.tracking.plots import plot_routing_heatmap
        from mod_train.tracking.run_files import ROUTING_DIR, routing_heatmap_name

        loads = gather_routing_loads(self.chunks, self.num_layers, len(self.labels), self.device)
        if self.is_main:
            png = plot_routing_heatmap(loads, self.run_dir / ROUTING_DIR / routing_heatmap_name(state.step),
                                       self.labels, title=f"routing shares up to step {state.step}")
            if png is not None:
                self.run_logger.log_artifact(png, artifact_path=ROUTING_DIR)
