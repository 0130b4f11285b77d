"""One MLflow run per run directory whatever the kill point; buffered metrics retried in the
background during the run; an end-of-run outage marked in the run directory and finished by
mod-mlflow-sync. Real MLflow stores: sqlite for the kill test, a real ``mlflow server`` whose port
closes and opens again for the others (tests/mlflow_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mod_train.config.schema import TrackingConfig
from mod_train.tracking.mlflow_run import MAX_RETRIES_ENV, TIMEOUT_ENV
from mod_train.tracking.run_files import MLFLOW_RUN_ID_FILE, MLFLOW_UNFINISHED_FILE
from mod_train.tracking.run_logger import open_run_logger
from tests.helpers_train import REPO
from tests.helpers import restored_env
from tests.mlflow_server import OutageProxy

CONFIG = {"model": {"hidden_size": 32}, "train": {"max_steps": 10}}


@pytest.fixture
def http_env():
    with restored_env(TIMEOUT_ENV, MAX_RETRIES_ENV):
        os.environ[TIMEOUT_ENV], os.environ[MAX_RETRIES_ENV] = "1", "0"
        yield


def _open(run_dir: Path, uri: str):
    run_dir.mkdir(parents=True, exist_ok=True)  # the trainer makes it before the logger
    return open_run_logger(TrackingConfig(tracking_uri=uri, experiment="rundir"), run_dir, is_main=True,
                           max_steps=10, run_id=None, config=CONFIG, resolved_yaml="x: 1\n", tags={})


def _history(client, run_id: str, key: str = "lm loss"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_kill_before_the_first_checkpoint_continues_the_same_mlflow_run(tmp_path):
    """The job is SIGKILLed after logging, before any checkpoint recorded the run id; the relaunch
    (run_id=None, as the trainer passes without a checkpoint) continues the same run."""
    from mlflow import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from tests.unit.test_mlflow_run_dir import _open
        logger = _open(Path({str(run_dir)!r}), {uri!r})
        step = int(sys.argv[1])
        logger.log(step, {{"lm loss": 10.0 - step}})
        if step == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        logger.close("FINISHED")
    """)
    for step, rc in ((1, -signal.SIGKILL), (2, 0)):
        r = subprocess.run([sys.executable, "-c", job, str(step)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == rc, r.stderr[-2000:]
        if step == 1:
            first = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rundir").experiment_id])
    assert [r.info.run_id for r in runs] == [first]
    assert runs[0].info.status == "FINISHED"
    assert _history(client, first) == [(1, 9.0), (2, 8.0)]


@pytest.mark.slow
def test_buffered_metrics_reach_a_server_that_comes_back_mid_run_and_an_end_outage_is_finished_by_sync(
        tmp_path, http_env, mlflow_server):
    from mlflow import MlflowClient

    from mod_train.tracking.sync import sync_run

    proxy = OutageProxy(mlflow_server)  # the session's server, behind a port that starts closed
    uri = proxy.uri
    run_dir = tmp_path / "run"
    logger = _open(run_dir, uri)  # server down at start: the run does not exist yet
    assert logger.run_id is None
    for step in (1, 2, 3):
        logger.log(step, {"lm loss": 10.0 - step})
    proxy.restore()
    try:
        # 1. No call on the logger: the background retry creates the run and delivers the buffer.
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (run_dir / MLFLOW_RUN_ID_FILE).exists():
            time.sleep(0.2)
        run_id = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
        while time.monotonic() < deadline and len(_history(client, run_id)) < 3:
            time.sleep(0.2)
        assert _history(client, run_id) == [(1, 9.0), (2, 8.0), (3, 7.0)]
        assert logger.run_id == run_id

        # 2. The server dies before the end: the run directory says what is left to do.
        proxy.cut()
        for step in (4, 5):
            logger.log(step, {"lm loss": 10.0 - step})
        logger.close("FINISHED")
        unfinished = json.loads((run_dir / MLFLOW_UNFINISHED_FILE).read_text())
        assert unfinished["run_id"] == run_id and unfinished["status"] == "FINISHED"
        assert unfinished["pending_metrics"] >= 2

        # 3. mod-mlflow-sync finishes it: the missing metrics and the final status, marker gone.
        proxy.restore()
        os.environ[TIMEOUT_ENV] = "30"  # a server on a loaded machine may be slow
        assert client.get_run(run_id).info.status == "RUNNING"
        result = sync_run(run_dir, tracking_uri=uri)
        assert result.run_id == run_id and result.metrics_uploaded >= 2
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert _history(client, run_id) == [(s, 10.0 - s) for s in range(1, 6)]
        assert not (run_dir / MLFLOW_UNFINISHED_FILE).exists()
        assert len(client.search_runs([run.info.experiment_id])) == 1
    finally:
        proxy.cut()
