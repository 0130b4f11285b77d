"""Where a run's metrics go: one small class per destination, all behind the ``Sink`` interface.

``RunLogger`` (run_logger.py) fans each logged step out to its sinks. A sink never changes
training state and never raises for a tracking failure that training can outlive (MLflow's
guarded path, see mlflow_run.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from mod_train.tracking.log_line import format_log_line
from mod_train.tracking.metrics_jsonl import MetricsJsonl
from mod_train.tracking.mlflow_run import MlflowTracker
from mod_train.tracking.run_record import clear_unfinished, mark_unfinished

PathLike = Union[str, os.PathLike]

# The extra of pyproject.toml that brings the TensorBoard writer.
TENSORBOARD_EXTRA = "tensorboard"


class Sink:
    """A destination for metrics (and, where it has a place for them, artifacts)."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Most sinks have no place for files: ignored unless overridden."""

    def close(self, status: str) -> None:
        """``status``: FINISHED / FAILED / KILLED, or RUNNING for an invocation a later one resumes."""


class ConsoleSink(Sink):
    """The Megatron-style log line (tracking/log_line.py) on stdout."""

    def __init__(self, max_steps: int, write: Callable[[str], None] = print) -> None:
        self.max_steps = max_steps
        self._write = write

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._write(format_log_line(step, self.max_steps, metrics))


class JsonlSink(Sink):
    """Rows of ``metrics.jsonl``: the record that needs no server (mod-mlflow-sync reads it)."""

    def __init__(self, path: PathLike) -> None:
        self._file = MetricsJsonl(path)

    @property
    def path(self) -> Path:
        return self._file.path

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._file.append(step, metrics)

    def close(self, status: str) -> None:
        self._file.close()


class MlflowSink(Sink):
    """The run's MLflow run through ``MlflowTracker`` (buffered, survives a dead server).

    ``run_dir``: where a job that ends during an outage leaves ``mlflow_unfinished.json`` (the run
    id, the final status it wanted), so ``mod-mlflow-sync`` can finish the run."""

    def __init__(self, tracker: MlflowTracker, run_dir: Optional[PathLike] = None) -> None:
        self.tracker = tracker
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact(str(path), artifact_path=artifact_path)

    def close(self, status: str) -> None:
        if status == "RUNNING":
            self.tracker.flush()  # stays open in MLflow; the resumed invocation continues it
            return
        pending = self.tracker.pending_metrics
        delivered = self.tracker.end(status)
        if self.run_dir is None or not self.tracker.enabled:
            return
        if delivered:
            clear_unfinished(self.run_dir)
        else:
            path = mark_unfinished(self.run_dir, self.tracker.run_id, status, self.tracker.tracking_uri,
                                   max(pending, self.tracker.pending_metrics))
            print(f"mod-train: the MLflow run could not be finished (tracking server unreachable); {path} "
                  f"records it: run `mod-mlflow-sync --run-dir {self.run_dir}` when the server is back", flush=True)


class TensorBoardMissing(RuntimeError):
    pass


def check_tensorboard() -> None:
    """Raise TensorBoardMissing, naming the extra to install, when the writer cannot be imported."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TensorBoardMissing(
            "tracking.tensorboard=true needs the 'tensorboard' package: install the extra with "
            f"`pip install -e '.[{TENSORBOARD_EXTRA}]'` (or `pip install tensorboard`), "
            "or set tracking.tensorboard=false")


class TensorBoardSink(Sink):
    """Scalars in TensorBoard event files (``torch.utils.tensorboard``), one tag per metric.

    ``first_step``: the first step this invocation logs; events at and after it left by an
    earlier invocation (the steps between its last checkpoint and its end) are purged, so a
    resumed run shows one curve.
    """

    def __init__(self, log_dir: PathLike, first_step: Optional[int] = None) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self, status: str) -> None:
        self._writer.close()
