"""metrics.jsonl: one JSON object per logged step, the tracking record that needs no server.

A resumed run appends to the same file, so steps between the last checkpoint and a crash appear
twice; ``read_metrics`` resolves that by keeping the last entry per step, ``metrics_by_step`` /
``merged_rows`` by merging the rows of a step (training and evaluation) key by key.
Non-finite floats are written as Python's json does (NaN, Infinity): a diverging loss stays
visible, and json.loads / pandas read them back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from mod_train.tracking.keys import STEP, TIME


def _jsonable(obj: Any) -> Any:
    # Tolerate numpy / 0-d tensor scalars that slip through: .item() gives the Python number.
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    return str(obj)


class MetricsJsonl:
    """Appends rows ``{"step": .., "time": <unix s>, <metric>: <value>, ...}``, flushed per line."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A process killed mid-write can leave a partial last line; start on a fresh line so
        # only that fragment is unreadable, not our first row too.
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def append(self, step: int, metrics: Mapping[str, Any], time_s: Optional[float] = None) -> Dict[str, Any]:
        """Write one row (``time_s`` defaults to now) and flush it; returns the row written."""
        row: Dict[str, Any] = {STEP: int(step), TIME: time.time() if time_s is None else time_s}
        row.update((k, v) for k, v in metrics.items() if k not in (STEP, TIME))
        self._file.write(json.dumps(row, default=_jsonable) + "\n")
        self._file.flush()
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsJsonl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(path: Union[str, os.PathLike]) -> Iterator[Dict[str, Any]]:
    """The readable rows of a metrics.jsonl in file order: JSON objects with an integer step.

    A missing file gives nothing; unparseable lines (a crash mid-write) are skipped.
    """
    try:
        f = open(path, "r", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = row.get(STEP) if isinstance(row, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                yield row


def read_metrics(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Rows of a metrics.jsonl sorted by step, the last-written row winning for a repeated step.

    A missing file gives []; unparseable lines (a crash mid-write) and rows without an integer
    step are skipped.
    """
    by_step: Dict[int, Dict[str, Any]] = {row[STEP]: row for row in _rows(path)}
    return [by_step[s] for s in sorted(by_step)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_by_step(path: Union[str, os.PathLike]) -> Dict[int, Dict[str, Tuple[float, float]]]:
    """``{step: {key: (value, unix_time)}}`` from a metrics.jsonl, numeric values only.

    Rows of one step are merged (a step can have a training row and an evaluation row); a key
    written twice for a step (a resumed run repeats the steps after its last checkpoint) keeps
    the last value. Unreadable lines are skipped; a missing file gives {}.
    """
    out: Dict[int, Dict[str, Tuple[float, float]]] = {}
    for row in _rows(path):
        t = row.get(TIME)
        t = float(t) if _is_number(t) else 0.0
        merged = out.setdefault(row[STEP], {})
        for key, value in row.items():
            if key not in (STEP, TIME) and _is_number(value):
                merged[key] = (float(value), t)
    return out


def merged_rows(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Rows ``{"step": s, <key>: value, ...}`` sorted by step, merged as in ``metrics_by_step``
    (for plots: evaluation rows do not hide the training values of their step)."""
    return [{STEP: s, **{k: v for k, (v, _) in kv.items()}}
            for s, kv in sorted(metrics_by_step(path).items())]
