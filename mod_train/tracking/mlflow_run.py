"""The MLflow run of one training job: create or resume it, log to it, never let it stop training.

Why not ``mlflow.start_run()``: the fluent API keeps the active run in module-global state and
lets any tracking-server failure raise into the training loop. Here every MLflow call goes
through one guarded path (``_sync``): everything logged is queued first, then sent; a failure
logs one warning per outage and keeps the queue (metrics keep their original step and
timestamp), and the queue is re-sent with ``MlflowClient.log_batch`` once the server answers
again. During an outage a background thread retries with backoff (1 s doubling up to
``retry_interval_s``), so a server that comes back mid-run gets the buffered metrics while the
job is still training, not only at ``flush``/``end``; the training thread then only queues
(metric values go through a lock-free inbox, so a step never waits on a request). If the server
is down at ``start()``, creating (or resuming) the run is deferred the same way; ``on_run_id`` is
called with the id as soon as the run exists (the run logger records it in the run directory).

Only rank 0 tracks: other ranks pass ``enabled=False``, which makes every method a no-op and
never imports mlflow.

Local store: with ``tracking_uri=None`` the run goes to ``sqlite:///<local_dir>/mlflow.db`` with
artifacts in ``<local_dir>/mlartifacts`` (``local_dir`` defaults to the working directory).
MLflow 3 puts the ./mlruns file store in maintenance mode and refuses it unless
MLFLOW_ALLOW_FILE_STORE=true; sqlite is its recommended local backend. View with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

HTTP timeouts: MLflow reads MLFLOW_HTTP_REQUEST_TIMEOUT and MLFLOW_HTTP_REQUEST_MAX_RETRIES from
the process environment on every request (its defaults, 120 s and 7 retries with backoff, would
stall a step for minutes). ``start()`` sets them for http(s) URIs: to the constructor values if
given, else to 5 s / 0 retries unless the environment already sets them.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import threading
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple, Union

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
MAX_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
DEFAULT_REQUEST_TIMEOUT_S = 5
DEFAULT_MAX_RETRIES = 0
DEFAULT_RETRY_INTERVAL_S = 30.0
DEFAULT_MAX_BUFFERED_METRICS = 200_000
FIRST_RETRY_DELAY_S = 1.0  # the background retry's first wait; doubled up to retry_interval_s
MIN_RETRY_DELAY_S = 0.1  # even with retry_interval_s=0 the retry thread does not spin

# MLflow's limits (mlflow.utils.validation), copied so a disabled tracker never imports mlflow;
# mod-mlflow-sync batches by them too.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Errors that re-sending cannot fix: the offending batch is dropped (with a warning) instead of
# blocking the queue forever. Everything else (connection refused, timeouts, 5xx, a locked
# sqlite file) counts as an outage and is retried.
_PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE",
    "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
})
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def default_tracking_uri(local_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """``sqlite:///<abs local_dir>/mlflow.db`` (``local_dir`` default: the working directory)."""
    return f"sqlite:///{Path(local_dir or os.getcwd()).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def mlflow_key(key: Any) -> Optional[str]:
    """A key MLflow accepts for metrics/params/tags, or None if nothing sensible is left.

    MLflow allows only ``[/\\w.\\- :]`` and no path tricks: "elapsed time per iteration (ms)"
    becomes "elapsed time per iteration ms".
    """
    name = re.sub(r"[()\[\]{}]", "", str(key))
    name = re.sub(r"[^/\w.\- :]", "_", name)
    name = re.sub(r"/+", "/", re.sub(r"\s+", " ", name)).strip(" /")
    if not name or len(name) > MAX_KEY_LENGTH or posixpath.normpath(name) != name:
        return None
    return name


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name`` on ``client``'s store: created if missing (artifacts next to a
    sqlite file, not in MLflow's cwd-relative ./mlruns default), restored if deleted. The one
    place experiments are made, for the tracker and for mod-mlflow-sync."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(tracking_uri)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it first
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first[:300]}"


class MlflowTracker:
    """One MLflow run for one training job (rank 0). See the module docstring for the guarantees."""

    def __init__(self, tracking_uri: Optional[str], experiment: str, run_name: Optional[str] = None,
                 run_id: Optional[str] = None, enabled: bool = True, *,
                 local_dir: Optional[Union[str, os.PathLike]] = None,
                 request_timeout_s: Optional[int] = None, max_retries: Optional[int] = None,
                 retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
                 max_buffered_metrics: int = DEFAULT_MAX_BUFFERED_METRICS,
                 on_run_id: Optional[Callable[[str], None]] = None) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri or default_tracking_uri(local_dir)
        self.experiment = experiment
        self.run_name = run_name
        self._run_id = run_id
        self._request_timeout_s = request_timeout_s
        self._max_retries = max_retries
        self._retry_interval_s = retry_interval_s
        self._max_buffered_metrics = max_buffered_metrics

        self._client: Any = None
        self._experiment_id: Optional[str] = None
        self._run_ready = False
        self._started = False
        self._ended = False
        # Outage bookkeeping: when it began (None: reachable) and when we last tried.
        self._down_since: Optional[float] = None
        self._last_attempt = float("-inf")
        self._dropped_in_outage = 0

        # The queue. Params already on the run are remembered so a resume re-logs only new keys.
        self._remote_params: Dict[str, str] = {}
        self._pending_params: Dict[str, str] = {}
        self._pending_tags: Dict[str, str] = {}
        self._pending_metrics: Deque[Tuple[str, float, int, int]] = deque()  # key, value, ms, step
        self._pending_artifacts: List[Tuple[str, Optional[str]]] = []
        self._warned: Set[str] = set()
        # Metric values logged by the training thread, moved into _pending_metrics under _lock by
        # whoever sends next (deque append/popleft are atomic: logging never takes the lock).
        self._inbox: Deque[Tuple[str, float, int, int]] = deque()
        self._lock = threading.RLock()  # one sender at a time: training thread or the retry thread
        self._retry_thread: Optional[threading.Thread] = None
        self._stop_retry = threading.Event()
        self._on_run_id = on_run_id

    # ---- public API ------------------------------------------------------------------------

    @property
    def run_id(self) -> Optional[str]:
        """The run's id once known (store it in checkpoints to resume the same run)."""
        return self._run_id

    @property
    def pending_metrics(self) -> int:
        """Number of metric values logged but not yet delivered."""
        return len(self._pending_metrics) + len(self._inbox)

    def start(self) -> Optional[str]:
        """Create the run, or resume ``run_id`` (status back to RUNNING); returns its id.

        Returns None (and retries later) when the store is unreachable and no ``run_id`` was
        given; read ``run_id`` again later. Never raises for tracking failures.
        """
        if not self.enabled:
            return None
        if not self._started:
            self._started = True
            self._apply_http_env()
            self._sync(force=True)
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (e.g. ``flatten_config(cfg)``); values are str()-ed, cut to 6000 chars.

        Keys already on a resumed run with the same value are skipped; a changed value is not
        logged (MLflow params are immutable) and warned about once per key.
        """
        if not self.enabled:
            return
        with self._lock:  # the retry thread may be sending the params dict
            self._queue_params(params)
        self._sync()

    def _queue_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            name = self._key(key, "param")
            if name is None:
                continue
            text = str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                self._warn_once(f"long:{name}", "param %r is %d chars; MLflow keeps the first %d",
                                name, len(text), MAX_PARAM_VAL_LENGTH)
                text = text[:MAX_PARAM_VAL_LENGTH]
            known = self._remote_params.get(name, self._pending_params.get(name))
            if known is None:
                self._pending_params[name] = text
            elif known != text:
                self._warn_changed_param(name, known, text)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log numeric metrics for ``step``, timestamped now; None values are skipped."""
        if not self.enabled:
            return
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            name = self._key(key, "metric")
            if name is None or value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                self._warn_once(f"nan:{name}", "metric %r has non-numeric value %r; not logged",
                                key, value)
                continue
            self._inbox.append((name, number, now_ms, int(step)))
        self._sync()

    def log_artifact(self, path: Union[str, os.PathLike], artifact_path: Optional[str] = None) -> None:
        """Upload a file or directory (read when it is sent: keep it until ``end``)."""
        if not self.enabled:
            return
        with self._lock:
            self._pending_artifacts.append((str(path), artifact_path))
        self._sync()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (overwritable, unlike params); values cut to 8000 chars."""
        if not self.enabled:
            return
        with self._lock:
            for key, value in tags.items():
                name = self._key(key, "tag")
                if name is not None:
                    self._pending_tags[name] = str(value)[:MAX_TAG_VAL_LENGTH]
        self._sync()

    def flush(self) -> bool:
        """Try to send everything queued now, regardless of the retry interval.

        True when nothing is left to send (always True when disabled).
        """
        if not self.enabled:
            return True
        return self._sync(force=True) and not self._has_pending()

    def end(self, status: str = "FINISHED") -> bool:
        """Flush, then mark the run ``status`` (FINISHED, FAILED or KILLED). Idempotent.

        Returns whether everything was delivered; if not, says what was lost.
        """
        if status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {_RUN_STATUSES}, got {status!r}")
        if not self.enabled or self._ended:
            return True
        self._stop_retry.set()
        delivered = self.flush() if self._started else not self._has_pending()
        if delivered and self._run_ready:
            try:
                self._client.set_terminated(self._run_id, status=status)
            except Exception as e:  # noqa: BLE001 - tracking must never stop the job
                self._mark_down(e)
                delivered = False
        if not delivered:
            log.warning(
                "MLflow run %s at %s could not be finalized: %d metric values, %d params, %d tags"
                " and %d artifacts were not delivered (metrics.jsonl still has the metrics)",
                self._run_id or "(never created)", self.tracking_uri, len(self._pending_metrics),
                len(self._pending_params), len(self._pending_tags), len(self._pending_artifacts),
            )
        self._ended = True
        return delivered

    # ---- the guarded path ----------------------------------------------------------------

    def _sync(self, force: bool = False) -> bool:
        """Ensure the run exists and send the queue; True on success. Never raises.

        Unforced calls (the training thread logging) never wait for the lock: while the retry
        thread sends, the values stay queued; in an outage they try at most every
        ``retry_interval_s`` (the retry thread tries in between)."""
        if not self._started:
            return False  # queued until start()
        now = time.monotonic()
        if self._down_since is not None and not force and now - self._last_attempt < self._retry_interval_s:
            return False  # in an outage: don't pay a timeout on every call
        if not self._lock.acquire(blocking=force):
            return False
        try:
            self._last_attempt = time.monotonic()
            self._drain_inbox()
            try:
                self._ensure_run()
                self._send_pending()
            except Exception as e:  # noqa: BLE001 - tracking must never stop the job
                self._mark_down(e)
                return False
            self._mark_up()
            return True
        finally:
            self._lock.release()

    def _drain_inbox(self) -> None:
        while self._inbox:
            self._pending_metrics.append(self._inbox.popleft())
        self._bound_buffer()

    def _retry_in_background(self) -> None:
        """The retry thread: resend with backoff until everything is delivered or ``end()``."""
        longest = max(self._retry_interval_s, MIN_RETRY_DELAY_S)
        delay = min(FIRST_RETRY_DELAY_S, longest)
        while not self._stop_retry.wait(delay):
            if self._sync(force=True) and not self._has_pending():
                return
            delay = min(delay * 2, longest)

    def _start_retry_thread(self) -> None:
        if self._stop_retry.is_set() or (self._retry_thread is not None and self._retry_thread.is_alive()):
            return
        self._retry_thread = threading.Thread(target=self._retry_in_background, name="mlflow-retry", daemon=True)
        self._retry_thread.start()

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "MLflow tracking at %s is unreachable or failing (%s); training continues, "
                "metrics are buffered and re-sent when it answers (retried at most every %.0f s)",
                self.tracking_uri, _short(exc), self._retry_interval_s,
            )
        else:
            log.debug("MLflow still unreachable: %s", _short(exc))
        self._start_retry_thread()

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.info("MLflow tracking at %s answers again after %.0f s; buffered data sent",
                     self.tracking_uri, time.monotonic() - self._down_since)
            self._down_since = None
            self._dropped_in_outage = 0

    def _apply_http_env(self) -> None:
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        for name, value, default in ((TIMEOUT_ENV, self._request_timeout_s, DEFAULT_REQUEST_TIMEOUT_S),
                                     (MAX_RETRIES_ENV, self._max_retries, DEFAULT_MAX_RETRIES)):
            if value is not None:
                os.environ[name] = str(int(value))
            else:
                os.environ.setdefault(name, str(default))

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            db = sqlite_path(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)  # sqlite does not create dirs
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _ensure_run(self) -> None:
        if self._run_ready:
            return
        from mlflow.exceptions import MlflowException

        client = self._get_client()
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(client, self.experiment, self.tracking_uri)
        if self._run_id is not None:
            try:
                run = client.get_run(self._run_id)
            except MlflowException as e:
                if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
                run = None
            if run is None or run.info.lifecycle_stage == "deleted":
                log.warning("MLflow run %s to resume is missing or deleted at %s; starting a new run",
                            self._run_id, self.tracking_uri)
                self._run_id = None
            else:
                if run.info.status != "RUNNING":
                    client.update_run(self._run_id, status="RUNNING")
                self._remote_params = dict(run.data.params)
        if self._run_id is None:
            run = client.create_run(self._experiment_id, run_name=self.run_name)
            self._run_id = run.info.run_id
            self._remote_params = {}
        self._run_ready = True
        if self._on_run_id is not None:
            try:
                self._on_run_id(self._run_id)
            except OSError as e:  # recording it must not stop tracking
                log.warning("could not record the MLflow run id %s: %s", self._run_id, e)

    def _send(self, what: str, call: Any) -> None:
        """Run one MLflow call; drop (with a warning) what the store rejects for good."""
        from mlflow.exceptions import MlflowException

        try:
            call()
        except MlflowException as e:
            if e.error_code not in _PERMANENT_ERROR_CODES:
                raise
            log.warning("MLflow rejected %s, dropping them: %s", what, _short(e))

    def _send_pending(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self._client, self._run_id

        # Params: only keys the run does not have yet (it may have them from before a resume).
        for name in list(self._pending_params):
            known = self._remote_params.get(name)
            if known is not None:
                if known != self._pending_params[name]:
                    self._warn_changed_param(name, known, self._pending_params[name])
                del self._pending_params[name]
        while self._pending_params:
            chunk = dict(islice(self._pending_params.items(), MAX_PARAMS_TAGS_PER_BATCH))
            self._send(f"{len(chunk)} params", lambda: client.log_batch(
                run_id, params=[Param(k, v) for k, v in chunk.items()]))
            for k, v in chunk.items():
                self._remote_params[k] = v
                del self._pending_params[k]

        while self._pending_tags:
            chunk = dict(islice(self._pending_tags.items(), MAX_PARAMS_TAGS_PER_BATCH))
            self._send(f"{len(chunk)} tags", lambda: client.log_batch(
                run_id, tags=[RunTag(k, v) for k, v in chunk.items()]))
            for k in chunk:
                del self._pending_tags[k]

        # Metrics in their original order, each with the step and timestamp it was logged at.
        # Re-sending a batch that did reach the store is harmless: MLflow ignores exact duplicates.
        while self._pending_metrics:
            batch = list(islice(self._pending_metrics, MAX_METRICS_PER_BATCH))
            self._send(f"{len(batch)} metric values", lambda: client.log_batch(
                run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch]))
            for _ in batch:
                self._pending_metrics.popleft()

        while self._pending_artifacts:
            path, artifact_path = self._pending_artifacts[0]
            if os.path.exists(path):
                self._send(f"artifact {path}",
                           lambda: client.log_artifact(run_id, path, artifact_path))
            else:
                log.warning("artifact %s no longer exists; not uploaded", path)
            self._pending_artifacts.pop(0)

    # ---- small helpers -------------------------------------------------------------------

    def _has_pending(self) -> bool:
        return bool(self._pending_params or self._pending_tags or self._pending_metrics or self._inbox
                    or self._pending_artifacts or (self._started and not self._run_ready))

    def _bound_buffer(self) -> None:
        excess = len(self._pending_metrics) - self._max_buffered_metrics
        if excess <= 0:
            return
        for _ in range(excess):
            self._pending_metrics.popleft()
        if self._dropped_in_outage == 0:
            log.warning("MLflow metric buffer is full (%d values); dropping the oldest "
                        "(metrics.jsonl keeps them)", self._max_buffered_metrics)
        self._dropped_in_outage += excess

    def _key(self, key: Any, kind: str) -> Optional[str]:
        name = mlflow_key(key)
        if name is None:
            self._warn_once(f"key:{key}", "%s name %r is not valid for MLflow; not logged", kind, key)
        return name

    def _warn_changed_param(self, name: str, old: str, new: str) -> None:
        self._warn_once(f"changed:{name}",
                        "param %r is already %r on this MLflow run; the new value %r is not "
                        "logged (MLflow params are immutable; record changes as tags)",
                        name, old[:200], new[:200])

    def _warn_once(self, token: str, msg: str, *args: Any) -> None:
        if token not in self._warned:
            self._warned.add(token)
            log.warning(msg, *args)
