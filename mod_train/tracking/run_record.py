"""The MLflow facts a run directory keeps for itself: which run it logs to (``mlflow_run_id``,
written the moment the run exists) and, after a job that could not finish its run (tracking
server down at the end), what is left to do (``mlflow_unfinished.json``). Written atomically
(temporary file + rename), so a kill never leaves half a file. The trainer writes them,
``mod-mlflow-sync`` reads them; neither imports the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from mod_train.tracking.run_files import MLFLOW_RUN_ID_FILE, MLFLOW_UNFINISHED_FILE

PathLike = Union[str, os.PathLike]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_id(run_dir: PathLike) -> Optional[str]:
    """The MLflow run id recorded in ``run_dir`` (None when there is none or it is unreadable)."""
    try:
        text = (Path(run_dir) / MLFLOW_RUN_ID_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and text.isalnum() else None


def record_run_id(run_dir: PathLike, run_id: str) -> None:
    if read_run_id(run_dir) != run_id:
        _write_atomic(Path(run_dir) / MLFLOW_RUN_ID_FILE, run_id + "\n")


def mark_unfinished(run_dir: PathLike, run_id: Optional[str], status: str, tracking_uri: str,
                    pending_metrics: int) -> Path:
    path = Path(run_dir) / MLFLOW_UNFINISHED_FILE
    _write_atomic(path, json.dumps({"run_id": run_id, "status": status, "tracking_uri": tracking_uri,
                                    "pending_metrics": pending_metrics}, indent=2) + "\n")
    return path


def read_unfinished(run_dir: PathLike) -> Optional[dict]:
    try:
        data = json.loads((Path(run_dir) / MLFLOW_UNFINISHED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clear_unfinished(run_dir: PathLike) -> None:
    (Path(run_dir) / MLFLOW_UNFINISHED_FILE).unlink(missing_ok=True)
