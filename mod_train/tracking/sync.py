"""`mod-mlflow-sync`: upload to MLflow what a run directory has and the MLflow run lacks.

    mod-mlflow-sync --run-dir runs/my_run --tracking-uri http://mlflow:5000

metrics.jsonl is the record that needs no server. When the tracking server was down for longer
than a job (the tracker's buffer dies with the process), this puts the missing metric values on
the run: for every metric key, the steps the run does not have yet, with the step and the time
they were logged at. Running it again uploads nothing (idempotent).

Which run: ``--run-id``; else the one recorded in ``<run_dir>/mlflow_run_id`` (written by the
trainer as soon as the run exists); else the one the latest checkpoint recorded; else the run tagged
``run_dir=<absolute run dir>`` in the experiment (the trainer sets that tag); else a new run is
created (not with ``--no-create``), with the params of ``resolved_config.yaml``.
Also uploaded when the run lacks them: params (from resolved_config.yaml), the artifacts
resolved_config.yaml and tokenizer.model, and loss_vs_flops.png (re-uploaded when metrics were
added, so the plot matches them). ``--set-status FINISHED`` closes a run whose job could not; a
job that ended while the server was down left ``mlflow_unfinished.json`` with the status it
wanted, which is then set without asking (and the file removed once the run is complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from mod_train.tracking.flatten import run_params
from mod_train.tracking.metrics_jsonl import metrics_by_step
from mod_train.tracking.mlflow_run import (
    MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_RETRIES_ENV, TIMEOUT_ENV,
    default_tracking_uri, ensure_experiment, mlflow_key,
)
from mod_train.tracking.run_files import LOSS_PLOT, METRICS_FILE, RESOLVED_CONFIG, RUN_DIR_TAG
from mod_train.tracking.run_record import clear_unfinished, read_run_id, read_unfinished

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def load_resolved_config(run_dir: PathLike) -> Optional[Dict[str, Any]]:
    """``<run_dir>/resolved_config.yaml`` as a dict, or None if missing or unreadable."""
    import yaml

    try:
        data = yaml.safe_load((Path(run_dir) / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def config_params(config: Mapping[str, Any]) -> Dict[str, str]:
    """The params the trainer logs for this config: flattened, minus the per-invocation keys."""
    return run_params(config)[0]


def _checkpoint_run_id(run_dir: Path, config: Optional[Mapping[str, Any]]) -> Optional[str]:
    from mod_train.checkpoint.layout import CheckpointDir, read_metadata

    ckpt = (config or {}).get("checkpoint", {}) or {}
    root = Path(ckpt["dir"]) if ckpt.get("dir") else run_dir / "checkpoints"
    latest = CheckpointDir(root).find_latest() if root.is_dir() else None
    if latest is None:
        return None
    try:
        run_id = read_metadata(latest[1]).get("train_state", {}).get("mlflow_run_id")
    except (OSError, ValueError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


# ---- the sync --------------------------------------------------------------------------------

@dataclass
class SyncResult:
    run_id: str
    created: bool = False
    metrics_uploaded: int = 0  # metric values (key, step) added to the run
    metrics_present: int = 0  # values metrics.jsonl has that the run already had
    params_uploaded: int = 0
    artifacts_uploaded: List[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "created run" if self.created else "run"
        arts = ", ".join(self.artifacts_uploaded) or "none"
        return (f"{what} {self.run_id}: uploaded {self.metrics_uploaded} metric values "
                f"({self.metrics_present} already present), {self.params_uploaded} params, "
                f"artifacts: {arts}")


class SyncError(RuntimeError):
    pass


def _set_http_defaults() -> None:
    # A CLI may wait longer than a training step, but not MLflow's default of minutes of retries.
    os.environ.setdefault(TIMEOUT_ENV, "30")
    os.environ.setdefault(MAX_RETRIES_ENV, "2")


def _experiment_id(client: Any, name: str, tracking_uri: str, create: bool) -> Optional[str]:
    if not create:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return None
    return ensure_experiment(client, name, tracking_uri)


def _find_run_by_tag(client: Any, experiment_id: str, run_dir: Path) -> Optional[str]:
    value = str(run_dir)
    if "'" in value:
        return None
    runs = client.search_runs([experiment_id], filter_string=f"tags.{RUN_DIR_TAG} = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=2)
    if len(runs) > 1:
        log.warning("%d runs are tagged %s=%s; using the newest, %s (pass --run-id to choose)",
                    len(runs), RUN_DIR_TAG, value, runs[0].info.run_id)
    return runs[0].info.run_id if runs else None


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def _chunks(items: List[Any], size: int) -> Iterable[List[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _artifact_names(client: Any, run_id: str) -> set:
    return {Path(a.path).name for a in client.list_artifacts(run_id)}


def sync_run(run_dir: PathLike, tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
             experiment: Optional[str] = None, create: bool = True, upload_artifacts: bool = True,
             set_status: Optional[str] = None) -> SyncResult:
    """Upload what ``run_dir`` has and the MLflow run lacks (see the module docstring).

    ``tracking_uri`` / ``experiment`` default to the run's resolved_config.yaml (and then to
    the local store / "mod-train"). Raises SyncError when there is nothing to sync or no run.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    run_dir = Path(run_dir).resolve()
    metrics_path = run_dir / METRICS_FILE
    config = load_resolved_config(run_dir)
    if not metrics_path.is_file() and config is None:
        raise SyncError(f"{run_dir} has neither {METRICS_FILE} nor {RESOLVED_CONFIG}")
    tracking = (config or {}).get("tracking", {}) or {}
    tracking_uri = tracking_uri or tracking.get("tracking_uri") or default_tracking_uri()
    experiment = experiment or tracking.get("experiment") or "mod-train"
    if tracking_uri.startswith(("http://", "https://")):
        _set_http_defaults()
    client = MlflowClient(tracking_uri=tracking_uri)

    created = False
    if run_id is not None:
        if not _run_exists(client, run_id):
            raise SyncError(f"MLflow run {run_id} does not exist at {tracking_uri}")
    else:
        candidate = read_run_id(run_dir) or _checkpoint_run_id(run_dir, config)
        if candidate is not None and _run_exists(client, candidate):
            run_id = candidate
        else:
            exp_id = _experiment_id(client, experiment, tracking_uri, create)
            if exp_id is not None:
                run_id = _find_run_by_tag(client, exp_id, run_dir)
            if run_id is None:
                if not create or exp_id is None:
                    raise SyncError(f"no MLflow run found for {run_dir} at {tracking_uri} "
                                    f"(experiment {experiment!r}); pass --run-id, or allow creating one")
                run_name = tracking.get("run_name") or run_dir.name
                run_id = client.create_run(exp_id, run_name=run_name,
                                           tags={RUN_DIR_TAG: str(run_dir),
                                                 "mod_train.created_by": "mod-mlflow-sync"}).info.run_id
                created = True
    result = SyncResult(run_id=run_id, created=created)
    run = client.get_run(run_id)

    # Params: only keys the run does not have (params are immutable).
    if config is not None:
        have = dict(run.data.params)
        missing = []
        for key, value in config_params(config).items():
            name = mlflow_key(key)
            if name is None:
                continue
            text = str(value)[:MAX_PARAM_VAL_LENGTH]
            if name not in have:
                missing.append(Param(name, text))
            elif have[name] != text:
                log.warning("param %r is %r on the run but %r in %s; left as is",
                            name, have[name][:200], text[:200], RESOLVED_CONFIG)
        for chunk in _chunks(missing, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        result.params_uploaded = len(missing)
    if RUN_DIR_TAG not in run.data.tags:
        client.log_batch(run_id, tags=[RunTag(RUN_DIR_TAG, str(run_dir))])

    # Metrics: per key, the steps the run lacks.
    by_key: Dict[str, Dict[int, Tuple[float, float]]] = {}
    for step, values in metrics_by_step(metrics_path).items():
        for key, vt in values.items():
            name = mlflow_key(key)
            if name is not None:
                by_key.setdefault(name, {})[step] = vt
    to_send = []
    for name, steps in sorted(by_key.items()):
        present = {m.step for m in client.get_metric_history(run_id, name)}
        for step, (value, t) in sorted(steps.items()):
            if step in present:
                result.metrics_present += 1
            else:
                to_send.append(Metric(name, value, int(t * 1000), step))
    for chunk in _chunks(to_send, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)
    result.metrics_uploaded = len(to_send)

    if upload_artifacts:
        names = _artifact_names(client, run_id)
        candidates = [run_dir / RESOLVED_CONFIG]
        tokenizer = ((config or {}).get("data", {}) or {}).get("tokenizer_model")
        if tokenizer:
            candidates.append(Path(tokenizer))
        for path in candidates:
            if path.is_file() and path.name not in names:
                client.log_artifact(run_id, str(path))
                result.artifacts_uploaded.append(path.name)
        plot = run_dir / LOSS_PLOT
        if plot.is_file() and (LOSS_PLOT not in names or result.metrics_uploaded):
            client.log_artifact(run_id, str(plot))
            result.artifacts_uploaded.append(LOSS_PLOT)

    unfinished = read_unfinished(run_dir)
    if set_status is None and unfinished is not None and unfinished.get("status") in ("FINISHED", "FAILED", "KILLED"):
        set_status = unfinished["status"]  # the status the job could not set
    if set_status is not None:
        client.set_terminated(run_id, status=set_status)
    if unfinished is not None:
        clear_unfinished(run_dir)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="mod-mlflow-sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the training run directory (train.run_dir)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the run's tracking.tracking_uri)")
    p.add_argument("--run-id", default=None, help="the MLflow run to complete (default: found, see above)")
    p.add_argument("--experiment", default=None, help="default: the run's tracking.experiment")
    p.add_argument("--no-create", action="store_true", help="fail instead of creating a run")
    p.add_argument("--no-artifacts", action="store_true", help="metrics and params only")
    p.add_argument("--set-status", choices=("FINISHED", "FAILED", "KILLED"), default=None,
                   help="also mark the run with this status (e.g. a job whose tracker could not)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mod-mlflow-sync: %(message)s")
    try:
        result = sync_run(args.run_dir, tracking_uri=args.tracking_uri, run_id=args.run_id,
                          experiment=args.experiment, create=not args.no_create,
                          upload_artifacts=not args.no_artifacts, set_status=args.set_status)
    except SyncError as e:
        print(f"mod-mlflow-sync: {e}", file=sys.stderr)
        sys.exit(1)
    print(result.summary())


if __name__ == "__main__":
    main()
