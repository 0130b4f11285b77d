"""A real `mlflow server` (sqlite backend, proxied artifacts) and real 2-process training runs.

The slow test kills the server (SIGKILL) twice during training: the first outage ends while the job
still runs (the tracker's buffer delivers it), the second outlasts the job (mod-mlflow-sync delivers
it from metrics.jsonl). The other tests cover mod-mlflow-sync on a local sqlite store.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from mod_train.tracking import MetricsJsonl, MlflowTracker, flatten_config
from mod_train.tracking.flatten import PER_INVOCATION_KEYS
from mod_train.tracking.metrics_jsonl import merged_rows, metrics_by_step
from mod_train.tracking.run_files import LOSS_PLOT
from mod_train.tracking.sync import SyncError, sync_run
from tests.helpers_train import REPO, free_port, tiny_overrides
from tests.mlflow_server import kill_server, start_server

EXPERIMENT = "server-e2e"


# ---- helpers ---------------------------------------------------------------------------------

def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = last_step(run_dir)
        if s >= step:
            return s
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout_s} s")


@contextmanager
def paused(proc: subprocess.Popen):
    """SIGSTOP the whole job (torchrun and its ranks) for the duration: the outage then begins and
    ends at known steps however fast this machine trains, and restarting the server (~10 s)
    cannot outlast the job."""
    import psutil

    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        p.suspend()
    try:
        yield
    finally:
        for p in procs:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass


def train_cmd(overrides) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "mod_train.train", *overrides]


def launch(overrides, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(overrides), cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finish(proc: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> str:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def sync_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mod_train.tracking.sync", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


# ---- the server path, with outages, through real training ----------------------------------

@pytest.mark.slow
def test_training_logs_to_server_through_outages_and_resume(tmp_path, tiny_data):
    from mlflow import MlflowClient

    server_dir, run_dir = tmp_path / "server", tmp_path / "run"
    server_dir.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    max_steps, first_leg = 60, 40
    overrides = tiny_overrides(
        tiny_data, f"train.max_steps={max_steps}", "checkpoint.save_interval=20",
        f"train.run_dir={run_dir}", f"tracking.tracking_uri={uri}", f"tracking.experiment={EXPERIMENT}")
    log1, log2 = tmp_path / "train1.log", tmp_path / "train2.log"

    server = start_server(port, server_dir)
    try:
        # 1. The server dies during the first invocation and comes back before it ends: the
        #    tracker's buffer delivers what was logged meanwhile.
        proc = launch(overrides + [f"train.exit_interval={first_leg}"], log1)
        wait_for_step(run_dir, 5, proc)
        with paused(proc):
            kill_server(server)
            down_from = last_step(run_dir) + 1
        wait_for_step(run_dir, down_from + 10, proc)  # steps logged while the server is down
        with paused(proc):
            server = start_server(port, server_dir)
            assert proc.poll() is None
        finish(proc, log1)
        assert last_step(run_dir) == first_leg

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert len(runs) == 1
        run_id = runs[0].info.run_id
        assert runs[0].info.status == "RUNNING"  # stopped by exit_interval: open for the resume
        steps = sorted(m.step for m in client.get_metric_history(run_id, "lm loss"))
        assert steps == list(range(1, first_leg + 1)), "the outage lost metrics"

        # 2. Resume; the server dies and stays down until the job has ended: the tracker cannot
        #    deliver, mod-mlflow-sync does (from metrics.jsonl), and a second sync adds nothing.
        proc = launch(overrides, log2)
        wait_for_step(run_dir, first_leg + 1, proc)
        with paused(proc):
            kill_server(server)
            down_from = last_step(run_dir) + 1
        out = finish(proc, log2)
        assert f"at step {first_leg}" in out and last_step(run_dir) == max_steps
        server = start_server(port, server_dir)
        have = sorted(m.step for m in client.get_metric_history(run_id, "lm loss"))
        # (the step being sent when the server died may or may not have made it)
        assert have == list(range(1, len(have) + 1)) and down_from - 2 <= len(have) < max_steps
        first = sync_cli("--run-dir", str(run_dir), "--tracking-uri", uri, "--set-status", "FINISHED")
        assert f"run {run_id}:" in first and "uploaded 0 metric values" not in first, first
        assert LOSS_PLOT in first  # redrawn at the end, never delivered by the tracker
        second = sync_cli("--run-dir", str(run_dir), "--tracking-uri", uri)
        assert "uploaded 0 metric values" in second and "0 params" in second, second

        # 3. One run, resumed in place, with everything metrics.jsonl has.
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        logged = metrics_by_step(run_dir / "metrics.jsonl")
        assert sorted(logged) == list(range(1, max_steps + 1))
        keys = {k for values in logged.values() for k in values}
        assert {"lm loss", "grad norm", "learning rate", "tokens/s", "total FLOPs"} <= keys
        for key in keys:
            name = key.replace("(", "").replace(")", "")  # MLflow's key rules: "(ms)" -> "ms"
            history = {}
            for m in client.get_metric_history(run_id, name):
                history.setdefault(m.step, set()).add(m.value)
            want = {s: v[key][0] for s, v in logged.items() if key in v}
            assert set(history) == set(want), f"{key}: steps differ"
            assert all(any(math.isclose(x, want[s], rel_tol=1e-9) or (math.isnan(x) and math.isnan(want[s]))
                           for x in history[s]) for s in want), f"{key}: values differ"

        # Params: the flattened resolved config minus the keys logged as tags.
        resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
        params = flatten_config(resolved)
        invocation = {k: params.pop(k) for k in PER_INVOCATION_KEYS}
        assert run.data.params == params
        tags = run.data.tags
        assert {tags[f"invocation.{k}"] for k in PER_INVOCATION_KEYS} == {str(v) for v in invocation.values()}
        assert tags["model.family"] == "dense" and tags["layout"] == "tp1_pp1_ep1_dp2_zero1"
        assert tags["run_dir"] == str(run_dir.resolve())
        flops_per_token = float(tags["flops_per_token"])
        tokens_per_step = resolved["parallel"]["micro_batch_size"] * 2 * resolved["model"]["seq_length"]
        assert math.isclose(logged[max_steps]["total FLOPs"][0], flops_per_token * tokens_per_step * max_steps,
                            rel_tol=1e-5)

        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"tok.model", "resolved_config.yaml", LOSS_PLOT} <= artifacts
        from mlflow.artifacts import download_artifacts

        png = Path(download_artifacts(run_id=run_id, artifact_path=LOSS_PLOT, dst_path=str(tmp_path),
                                      tracking_uri=uri))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        kill_server(server)


# ---- mod-mlflow-sync on a local store --------------------------------------------------------

@pytest.fixture(scope="module")
def store(mlflow_store):
    """The session's migrated sqlite store (creating one costs seconds of migrations)."""
    return mlflow_store[1]


def _fake_run_dir(path: Path, steps, experiment: str, uri: str) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl (train and eval rows), config, tokenizer."""
    path.mkdir(parents=True)
    (path / "tok.model").write_bytes(b"not really a tokenizer")
    config = {"model": {"hidden_size": 32, "mod": {"enabled": False}},
              "data": {"paths": ["/d/a"], "tokenizer_model": str(path / "tok.model")},
              "train": {"exit_interval": 5, "max_steps": 10},
              "checkpoint": {"dir": None, "resume": "auto"},
              "tracking": {"tracking_uri": uri, "experiment": experiment, "run_name": None}}
    (path / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    with MetricsJsonl(path / "metrics.jsonl") as m:
        for s in steps:
            m.append(s, {"lm loss": 10.0 - s, "elapsed time per iteration (ms)": 50.0 + s,
                         "total FLOPs": 1e9 * s}, time_s=1_700_000_000.0 + s)
            if s % 4 == 0:
                m.append(s, {"valid lm loss": 20.0 - s}, time_s=1_700_000_000.5 + s)
    return path


def test_metrics_by_step_merges_rows_last_value_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsJsonl(path) as m:
        m.append(1, {"lm loss": 3.0, "note": "text"}, time_s=1.0)
        m.append(1, {"valid lm loss": 4.0}, time_s=2.0)
        m.append(2, {"lm loss": 2.0}, time_s=3.0)
        m.append(2, {"lm loss": 1.5}, time_s=4.0)  # re-logged after a resume
    with open(path, "a") as f:
        f.write('{"step": 3, "lm lo')  # a crash mid-write
    assert metrics_by_step(path) == {1: {"lm loss": (3.0, 1.0), "valid lm loss": (4.0, 2.0)},
                                     2: {"lm loss": (1.5, 4.0)}}
    assert merged_rows(path) == [{"step": 1, "lm loss": 3.0, "valid lm loss": 4.0}, {"step": 2, "lm loss": 1.5}]
    assert metrics_by_step(tmp_path / "missing.jsonl") == {}


def test_sync_creates_the_run_when_the_server_never_saw_it(store, tmp_path):
    from mlflow import MlflowClient

    run_dir = _fake_run_dir(tmp_path / "run", range(1, 11), "sync-create", store)
    result = sync_run(run_dir)  # tracking URI and experiment from resolved_config.yaml
    assert result.created and result.metrics_uploaded == 10 * 3 + 2 and result.metrics_present == 0
    assert set(result.artifacts_uploaded) == {"resolved_config.yaml", "tok.model"}

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(result.run_id)
    assert run.info.run_name == "run" and run.data.tags["run_dir"] == str(run_dir.resolve())
    config = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    expected = flatten_config(config)
    for k in PER_INVOCATION_KEYS:
        expected.pop(k)
    assert run.data.params == expected
    history = client.get_metric_history(result.run_id, "elapsed time per iteration ms")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [
        (s, 50.0 + s, (1_700_000_000 + s) * 1000) for s in range(1, 11)]
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "valid lm loss")) == [4, 8]

    again = sync_run(run_dir)  # found by its run_dir tag; nothing left to send
    assert (again.run_id, again.created, again.metrics_uploaded, again.params_uploaded,
            again.artifacts_uploaded) == (result.run_id, False, 0, 0, [])
    assert again.metrics_present == 32
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sync_adds_only_the_missing_steps(store, tmp_path):
    from mlflow import MlflowClient

    run_dir = _fake_run_dir(tmp_path / "run", range(1, 21), "sync-partial", store)
    tracker = MlflowTracker(store, "sync-partial", run_name="partial")
    run_id = tracker.start()
    tracker.set_tags({"run_dir": str(run_dir.resolve())})
    for s in range(1, 9):  # what reached the server before it went away
        tracker.log_metrics({"lm loss": 10.0 - s}, step=s)
    assert tracker.end()

    result = sync_run(run_dir, tracking_uri=store, set_status="FINISHED")
    assert result.run_id == run_id and not result.created
    assert result.metrics_present == 8 and result.metrics_uploaded == 20 * 3 + 5 - 8
    client = MlflowClient(tracking_uri=store)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "lm loss"))
    assert loss == [(s, 10.0 - s) for s in range(1, 21)]  # no step twice
    assert sync_run(run_dir, tracking_uri=store).metrics_uploaded == 0

    with pytest.raises(SyncError, match="does not exist"):
        sync_run(run_dir, tracking_uri=store, run_id="0123456789abcdef0123456789abcdef")
