"""One run logger: every logged step goes to all of the run's sinks (console, metrics.jsonl,
MLflow, optionally TensorBoard), every artifact to those that keep files.

Only the main rank (global rank 0) tracks: ``open_run_logger`` gives the other ranks a logger
without sinks, so the training loop calls the same methods on every rank.

    logger = open_run_logger(cfg.tracking, run_dir, is_main=..., max_steps=..., run_id=...,
                             config=plain_cfg, resolved_yaml=yaml_text, tags={...})
    logger.log(step, metrics)
    logger.log_artifact(png, artifact_path="routing")
    logger.close("FINISHED")   # or "RUNNING" for an invocation that a later one resumes
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

from mod_train.config.schema import TrackingConfig
from mod_train.tracking.flatten import run_params
from mod_train.tracking.mlflow_run import MlflowTracker
from mod_train.tracking.run_files import METRICS_FILE, RESOLVED_CONFIG, RUN_DIR_TAG, TENSORBOARD_DIR
from mod_train.tracking.run_record import read_run_id, record_run_id
from mod_train.tracking.sinks import ConsoleSink, JsonlSink, MlflowSink, Sink, TensorBoardSink, check_tensorboard

PathLike = Union[str, os.PathLike]


class RunLogger:
    """Fans metrics and artifacts out to ``sinks``; knows the MLflow run id (for checkpoints)."""

    def __init__(self, sinks: Sequence[Sink], run_id: Optional[str] = None) -> None:
        self.sinks: List[Sink] = list(sinks)
        self._run_id = run_id

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run's id once known (it is late if the server was down at start); without
        an MLflow sink, the id this logger was opened with (the one to resume)."""
        for sink in self.sinks:
            if isinstance(sink, MlflowSink):
                return sink.tracker.run_id
        return self._run_id

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_metrics(step, metrics)

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        for sink in self.sinks:
            sink.log_artifact(path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        for sink in self.sinks:
            sink.close(status)


def open_run_logger(tracking: TrackingConfig, run_dir: PathLike, *, is_main: bool, max_steps: int,
                    run_id: Optional[str], config: Mapping[str, Any], resolved_yaml: str,
                    tags: Mapping[str, str], artifacts: Sequence[PathLike] = (),
                    first_step: int = 1) -> RunLogger:
    """The run's logger, on every rank (see the module docstring).

    On the main rank: starts (or resumes ``run_id``) the MLflow run when ``tracking.enabled``,
    logs the params of ``config`` and the invocation/``tags`` tags, writes ``resolved_yaml`` to
    ``<run_dir>/resolved_config.yaml`` and logs it and ``artifacts`` (e.g. the tokenizer), opens
    ``metrics.jsonl`` and, with ``tracking.tensorboard``, ``<run_dir>/tensorboard``.
    ``first_step``: the first step this invocation will log (TensorBoard purges later events of
    an earlier invocation). A missing TensorBoard package fails on every rank, before any sink
    is opened.
    """
    if tracking.tensorboard:
        check_tensorboard()
    if not is_main:
        return RunLogger([], run_id=run_id)
    run_dir = Path(run_dir)
    # One MLflow run per run directory, whatever the kill point: the id recorded in the run
    # directory (written as soon as the run exists) wins over the checkpoint's, which a kill
    # before the first save never wrote.
    run_id = read_run_id(run_dir) or run_id
    tracker = MlflowTracker(tracking_uri=tracking.tracking_uri, experiment=tracking.experiment,
                            run_name=tracking.run_name or run_dir.name, run_id=run_id,
                            enabled=tracking.enabled, on_run_id=lambda rid: record_run_id(run_dir, rid))
    tracker.start()
    params, invocation_tags = run_params(config)
    tracker.log_params(params)
    tracker.set_tags(invocation_tags)
    tracker.set_tags({**tags, RUN_DIR_TAG: str(run_dir.resolve())})  # how mod-mlflow-sync finds the run
    for path in artifacts:
        tracker.log_artifact(str(path))
    resolved = run_dir / RESOLVED_CONFIG
    resolved.write_text(resolved_yaml)
    tracker.log_artifact(str(resolved))

    sinks: List[Sink] = [ConsoleSink(max_steps, write=_print_flushed), JsonlSink(run_dir / METRICS_FILE),
                         MlflowSink(tracker, run_dir)]
    if tracking.tensorboard:
        sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, first_step=first_step))
    return RunLogger(sinks, run_id=run_id)


def _print_flushed(line: str) -> None:
    print(line, flush=True)
