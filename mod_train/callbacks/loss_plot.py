"""Main rank: <run_dir>/loss_vs_flops.png from metrics.jsonl, logged as an artifact, at
checkpoints at most every ``interval_s`` and always at the end of an invocation. A plot never
stops training; without matplotlib it is skipped (a logged note)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mod_train.callbacks.base import Callback
from mod_train.checkpoint.state import TrainState
from mod_train.tracking.run_logger import RunLogger

log = logging.getLogger("mod_train")

# loss_vs_flops.png is redrawn at checkpoints at most this often (and at the end of each invocation).
LOSS_PLOT_INTERVAL_S = 300.0


class LossPlot(Callback):
    def __init__(self, run_dir: Path, run_logger: RunLogger, is_main: bool,
                 interval_s: float = LOSS_PLOT_INTERVAL_S) -> None:
        self.run_dir = Path(run_dir)
        self.run_logger = run_logger
        self.is_main = is_main
        self.interval_s = interval_s
        self.last_drawn = float("-inf")

    def on_save(self, state: TrainState, path: Path, last: bool) -> None:
        if last or time.monotonic() - self.last_drawn >= self.interval_s:
            self.draw()

    def draw(self) -> None:
        if not self.is_main:
            return
        self.last_drawn = time.monotonic()
        try:
            from mod_train.tracking.metrics_jsonl import merged_rows
            from mod_train.tracking.plots import plot_loss_vs_flops
            from mod_train.tracking.run_files import LOSS_PLOT, METRICS_FILE

            png = plot_loss_vs_flops(merged_rows(self.run_dir / METRICS_FILE), self.run_dir / LOSS_PLOT)
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            log.warning("loss-vs-FLOPs plot failed: %s", e)
            return
        if png is not None:
            self.run_logger.log_artifact(png)
