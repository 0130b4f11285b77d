"""Tracking: MLflow lifecycle against real stores (sqlite; a real `mlflow server` behind a port
that closes and opens again in the slow test), metrics.jsonl, the log line, config flattening,
plots."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from contextlib import closing
from datetime import datetime

import pytest

from mod_train.tracking import (
    MetricsJsonl, MlflowTracker, default_tracking_uri, flatten_config, format_log_line,
    plot_loss_vs_flops, read_metrics,
)
from mod_train.config.schema import TrackingConfig
from mod_train.distributed.world import free_port
from mod_train.tracking import keys as K
from mod_train.tracking.flatten import PER_INVOCATION_KEYS
from mod_train.tracking.run_files import METRICS_FILE, RESOLVED_CONFIG, RUN_DIR_TAG, TENSORBOARD_DIR
from mod_train.tracking.run_logger import open_run_logger
from mod_train.tracking.mlflow_run import MAX_RETRIES_ENV, TIMEOUT_ENV
from tests.helpers import restored_env
from tests.mlflow_server import OutageProxy

LOGGER = "mod_train.tracking.mlflow_run"


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(mlflow_store):
    """The session's migrated sqlite store (creating one costs ~5 s of MLflow migrations)."""
    return mlflow_store


@pytest.fixture
def http_env():
    """The tracker sets MLflow's HTTP env vars process-wide; restore them after the test."""
    with restored_env(TIMEOUT_ENV, MAX_RETRIES_ENV):
        yield


def _outage_warnings(caplog) -> int:
    return sum(1 for r in caplog.records
               if r.name == LOGGER and r.levelno == logging.WARNING and "unreachable" in r.getMessage())


def _config() -> dict:
    # > 100 params (MLflow's batch limit) and one value over its 6000-char limit.
    return {
        "model": {"hidden_size": 64, "num_layers": 2, "mod": {"capacity": 0.125}},
        "data": {"paths": ["/data/a", "/data/b"], "weights": None},
        "sweep": {f"k{i:03d}": i for i in range(150)},
        "notes": "x" * 7000,
    }


def _history(client, run_id, key):
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


# ---- MLflow on a local sqlite store ------------------------------------------------------------

def test_run_lifecycle_and_resume_same_run(store, tmp_path, caplog):
    from mlflow import MlflowClient

    _, uri = store
    caplog.set_level(logging.WARNING, logger=LOGGER)
    params = flatten_config(_config())
    assert len(params) > 100

    first = MlflowTracker(uri, "lifecycle", run_name="tiny")
    run_id = first.start()
    assert run_id and first.run_id == run_id
    first.log_params(params)
    first.set_tags({"git_commit": "abc123"})
    for step in range(5):
        first.log_metrics({"lm loss": 10.0 - step, "elapsed time per iteration (ms)": 100 + step,
                           "TFLOP/s/device": 0.5, "skipped": None}, step=step)
    artifact = tmp_path / "config.yaml"
    artifact.write_text("model: tiny\n")
    first.log_artifact(artifact)
    assert first.end("KILLED") and first.pending_metrics == 0
    assert first.end("FINISHED")  # idempotent

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"

    # Resume after a "crash": same run, old params re-logged unchanged, one changed, one new.
    resumed = MlflowTracker(uri, "lifecycle", run_id=run_id)
    assert resumed.start() == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_params({**params, "model.hidden_size": "128", "train.max_steps": "20"})
    for step in range(5, 10):
        resumed.log_metrics({"lm loss": 10.0 - step, "elapsed time per iteration (ms)": 100 + step,
                             "TFLOP/s/device": 0.5}, step=step)
    assert resumed.end()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {**params, "notes": "x" * 6000, "train.max_steps": "20"}
    assert run.data.tags["git_commit"] == "abc123"
    loss = _history(client, run_id, "lm loss")
    assert [(s, v) for s, v, _ in loss] == [(s, 10.0 - s) for s in range(10)]
    # Keys MLflow rejects are made valid rather than dropped: "(ms)" -> "ms".
    assert [s for s, _, _ in _history(client, run_id, "elapsed time per iteration ms")] == list(range(10))
    assert [s for s, _, _ in _history(client, run_id, "TFLOP/s/device")] == list(range(10))
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("'model.hidden_size' is already '64'" in m for m in messages)
    assert any("'notes' is 7000 chars" in m for m in messages)
    assert _outage_warnings(caplog) == 0


def test_resume_of_unknown_run_starts_a_new_one(store, caplog):
    _, uri = store
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = MlflowTracker(uri, "unknown-run", run_id="0123456789abcdef0123456789abcdef")
    run_id = tracker.start()
    assert run_id and run_id != "0123456789abcdef0123456789abcdef"
    assert any("missing or deleted" in r.getMessage() for r in caplog.records)
    assert tracker.end()


def test_default_store_is_sqlite_with_local_artifacts(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    root, uri = store
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert MlflowTracker(None, "e").tracking_uri == default_tracking_uri()

    tracker = MlflowTracker(None, "default-store", local_dir=root)
    assert tracker.tracking_uri == uri
    run_id = tracker.start()
    (tmp_path / "note.txt").write_text("hi")
    tracker.log_artifact(tmp_path / "note.txt")
    assert tracker.end()
    art = MlflowClient(tracking_uri=uri).get_run(run_id).info.artifact_uri
    assert art.startswith((root / "mlartifacts").resolve().as_uri())
    assert list((root / "mlartifacts").rglob("note.txt"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_disabled_tracker_does_nothing():
    t = MlflowTracker("http://127.0.0.1:1", "x", enabled=False)
    assert t.start() is None
    t.log_params({"a": 1})
    t.log_metrics({"lm loss": 1.0}, step=1)
    t.set_tags({"a": "b"})
    t.log_artifact("/nonexistent")
    assert t.flush() and t.end() and t.run_id is None and t.pending_metrics == 0


# ---- an unreachable or hanging tracking server ------------------------------------------------

def test_unreachable_server_never_raises_and_warns_once(http_env, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    uri = f"http://127.0.0.1:{free_port()}"
    # retry_interval_s=0: every call really tries the server, so each must be fast on its own.
    tracker = MlflowTracker(uri, "down", request_timeout_s=1, retry_interval_s=0)
    t0 = time.monotonic()
    assert tracker.start() is None  # creation deferred until the server answers
    assert time.monotonic() - t0 < 3
    assert os.environ[TIMEOUT_ENV] == "1" and os.environ[MAX_RETRIES_ENV] == "0"
    tracker.log_params({"a": 1})
    for step in range(5):
        t0 = time.monotonic()
        tracker.log_metrics({"lm loss": 1.0 / (step + 1), "grad norm": 0.5}, step=step)
        assert time.monotonic() - t0 < 3
    assert tracker.pending_metrics == 10
    assert _outage_warnings(caplog) == 1
    assert not tracker.flush()
    assert not tracker.end()
    assert any("not delivered" in r.getMessage() for r in caplog.records)


def test_hanging_server_costs_one_timeout_then_buffers(http_env, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)  # accepts connections in the kernel, never answers
        uri = f"http://127.0.0.1:{sink.getsockname()[1]}"
        tracker = MlflowTracker(uri, "hang", request_timeout_s=1, retry_interval_s=60)
        t0 = time.monotonic()
        assert tracker.start() is None
        assert time.monotonic() - t0 < 4
        t0 = time.monotonic()
        for step in range(50):  # within the retry interval: queued without touching the network
            tracker.log_metrics({"lm loss": 2.0}, step=step)
        assert time.monotonic() - t0 < 0.5
        assert tracker.pending_metrics == 50
        assert _outage_warnings(caplog) == 1


# ---- a real mlflow server that goes away and comes back ----------------------------------------

@pytest.mark.slow
def test_server_outages_before_and_after_start(http_env, caplog, mlflow_server):
    from mlflow import MlflowClient

    caplog.set_level(logging.INFO, logger=LOGGER)
    # The session's server behind a port of this test's own: closed (connection refused, open
    # connections reset, as when the server dies) and opened again, with what was logged kept.
    proxy = OutageProxy(mlflow_server)
    uri = proxy.uri
    tracker = MlflowTracker(uri, "outages", run_name="srv", request_timeout_s=2, retry_interval_s=0.2)

    def log_steps(steps):
        for step in steps:
            t0 = time.monotonic()
            tracker.log_metrics({"lm loss": 100.0 - step}, step=step)
            assert time.monotonic() - t0 < 5

    # 1. Down at start: the run is created once the server is up.
    assert tracker.start() is None
    tracker.log_params({"model.hidden_size": 64})
    log_steps(range(0, 5))
    logged_before_server = int(time.time() * 1000)
    proxy.restore()
    try:
        time.sleep(0.3)
        log_steps(range(5, 10))
        deadline = time.monotonic() + 10  # sent by the logging call or by the background retry thread
        while time.monotonic() < deadline and (tracker.run_id is None or tracker.pending_metrics):
            time.sleep(0.1)
        run_id = tracker.run_id
        assert run_id is not None and tracker.pending_metrics == 0

        # 2. Down after start: buffered, then flushed to the same run.
        proxy.cut()
        log_steps(range(10, 15))
        assert tracker.pending_metrics == 5 and tracker.run_id == run_id
        proxy.restore()
        assert tracker.flush() and tracker.end()

        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"model.hidden_size": "64"}
        history = _history(client, run_id, "lm loss")
        assert [(s, v) for s, v, _ in history] == [(s, 100.0 - s) for s in range(15)]
        # Buffered values keep the time they were logged at, not the time they were sent.
        assert all(ts <= logged_before_server for s, _, ts in history if s < 5)
        assert len(client.search_runs([run.info.experiment_id])) == 1
    finally:
        proxy.cut()
    assert _outage_warnings(caplog) == 2  # one per outage, not one per call
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 2


# ---- metrics.jsonl ---------------------------------------------------------------------------

def test_metrics_jsonl_append_resume_last_wins(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsJsonl(path) as m:
        for step in (1, 2, 3):
            row = m.append(step, {"lm loss": 5.0 - step, "step": 99}, time_s=1000.0 + step)
        assert row == {"step": 3, "time": 1003.0, "lm loss": 2.0}
        assert len(path.read_text().splitlines()) == 3  # flushed per line, before close
    with open(path, "a") as f:
        f.write('{"step": 4, "lm lo')  # killed mid-write
    # Resumed from the checkpoint at step 2: steps 3.. are logged again.
    with MetricsJsonl(path) as m:
        m.append(3, {"lm loss": 1.5, "grad norm": float("nan")})
        m.append(4, {"lm loss": 1.25})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lm loss"] == 1.5 and math.isnan(rows[2]["grad norm"])
    assert rows[0] == {"step": 1, "time": 1001.0, "lm loss": 4.0}
    assert read_metrics(tmp_path / "missing.jsonl") == []


# ---- log line, flatten, plots ----------------------------------------------------------------

def test_log_line_megatron_format():
    line = format_log_line(10, 100, {
        "step": 10, "time": 1.0,
        "TFLOP/s/device": 0.0123, "grad norm": 1.2345, "lm loss": 5.123456,
        "consumed samples": 320, "elapsed time per iteration (ms)": 123.44,
        "learning rate": 1e-4, "global batch size": 32, "tokens/s": 1234.4, "MFU": 0.4,
        "mod router loss": 0.25, "loss scale": None,
    }, now=datetime(2026, 11, 22, 10, 0, 0))
    assert line == (
        " [2026-11-22 10:00:00] iteration       10/     100 | consumed samples:          320 |"
        " elapsed time per iteration (ms): 123.4 | learning rate: 1.000000E-04 |"
        " global batch size:    32 | lm loss: 5.123456E+00 | mod router loss: 2.500000E-01 |"
        " grad norm: 1.234 | tokens/s: 1234 | TFLOP/s/device: 0.01 | MFU: 40.00% |"
    )
    counters = format_log_line(7, 9, {K.NAN_ITERATIONS: 1.0, K.ROLLBACKS: 2.0, K.LOSS_SPIKES: 3.0,
                                      K.SKIPPED_ITERATIONS: 1.0, K.MEMORY_GB: 12.345},
                               now=datetime(2026, 11, 22, 10, 0, 0))
    assert counters.endswith(" memory (GB): 12.35 | skipped iterations:   1 | nan iterations:   1 |"
                             " loss spikes:   3 | rollbacks:   2 |")
    short = format_log_line(1, 5, {"lm loss": float("nan"), "TFLOP/s/device": 0.0012})
    assert short.endswith("iteration        1/       5 | lm loss: NAN | TFLOP/s/device: 1.20E-03 |")


def test_flatten_config():
    flat = flatten_config({"model": {"hidden_size": 64, "mod": {"enabled": True, "extra": {}}},
                           "data": {"paths": ["a", "b"], "weights": None}, "seed": 1})
    assert flat == {"model.hidden_size": "64", "model.mod.enabled": "True", "model.mod.extra": "{}",
                    "data.paths": '["a", "b"]', "data.weights": "None", "seed": "1"}


def test_plot_loss_vs_flops(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "lm loss": 10.0 / s, "total FLOPs": 1e12 * s} for s in range(1, 20)]
    out = plot_loss_vs_flops(rows, tmp_path / "plots" / "loss_vs_flops.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss_vs_flops([{"step": 1, "lm loss": 1.0}], tmp_path / "none.png") is None


def test_run_logger_main_rank_writes_every_sink(store, tmp_path, capsys):
    """The run logger of the main rank: console line, metrics.jsonl, MLflow run (params, per-invocation
    tags, trainer tags, run_dir tag), resolved config and TensorBoard events."""
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient

    (tmp_path / "run").mkdir()
    config = {"model": {"hidden_size": 8}, "train": {"exit_interval": 5}, "checkpoint": {"resume": "auto"}}
    logger = open_run_logger(TrackingConfig(tracking_uri=store[1], experiment="runlogger", tensorboard=True),
                             tmp_path / "run", is_main=True, max_steps=10, run_id=None, config=config,
                             resolved_yaml="model:\n  hidden_size: 8\n", tags={"model.family": "dense"})
    logger.log(1, {K.LM_LOSS: 3.0, K.GRAD_NORM: 1.5})
    logger.log(2, {K.LM_LOSS: 2.0})
    run_id = logger.run_id
    logger.close("FINISHED")

    run_dir = tmp_path / "run"
    out = capsys.readouterr().out
    assert "iteration        1/      10" in out and "lm loss: 2.000000E+00" in out  # the console line
    assert [(r["step"], r[K.LM_LOSS]) for r in read_metrics(run_dir / METRICS_FILE)] == [(1, 3.0), (2, 2.0)]
    assert (run_dir / RESOLVED_CONFIG).read_text().startswith("model:")

    run = MlflowClient(store[1]).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[K.LM_LOSS] == 2.0
    assert run.data.params["model.hidden_size"] == "8"
    assert not set(PER_INVOCATION_KEYS) & set(run.data.params)  # per-invocation keys are tags
    assert run.data.tags["invocation.train.exit_interval"] == "5"
    assert run.data.tags["model.family"] == "dense"
    assert run.data.tags[RUN_DIR_TAG] == str(run_dir.resolve())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars(K.LM_LOSS)] == [(1, 3.0), (2, 2.0)]
    assert [e.step for e in events.Scalars(K.GRAD_NORM)] == [1]
