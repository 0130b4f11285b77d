"""End-to-end against a REAL Slurm (one node on localhost, see tests/e2e/slurm_cluster.py).

1. `mod-submit prep`: tokenizer job -> tokenization array over 2 input shards -> merge -> 2-rank CPU
   training, chained with afterok; checkpoints, metrics.jsonl, MLflow, per-rank logs; a finished
   shard is not redone when the array runs again, a removed one is rebuilt alone.
2. Pre-emption: SIGUSR1 to the batch shell mid-run -> the ranks checkpoint at the same step and
   exit -> the job requeues itself -> resumes -> per-step losses identical to the uninterrupted run.

Skipped (with the reason) only where Slurm cannot be installed or started. A third test (no Slurm
needed) checks that a signal reaching ONE rank stops every rank at the same step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mod_train.checkpoint.layout import CheckpointDir
from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.helpers_train import REPO, free_port, losses

pytestmark = pytest.mark.slow

MAX_STEPS = 80


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # short: the munge socket path has a length limit
    try:
        c = SlurmCluster(root).start()
    except SlurmUnavailable as e:  # cannot be installed or run here; a start failure is an error
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no Slurm cluster available: {e}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _train_overrides(data: Path, run_dir: Path) -> list:
    return [
        f"data.tokenizer_model={data}/tok.model", f"data.paths=[{data}/corpus]",
        f"train.run_dir={run_dir}", f"tracking.tracking_uri=sqlite:///{run_dir}/mlflow.db",
        "slurm.procs_per_node=2", "slurm.cpus_per_task=2", "slurm.time=00:15:00", "slurm.signal_seconds=60",
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
        "parallel.micro_batch_size=2", "optim.warmup_steps=3",
        "train.log_interval=1", "train.eval_interval=1000", f"train.max_steps={MAX_STEPS}",
        "checkpoint.save_interval=20", "checkpoint.keep_last=3",
    ]


def _submit(cluster, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=REPO, env=cluster.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _submissions(run_dir: Path) -> list:
    return [json.loads(l) for l in (run_dir / "slurm" / "submissions.jsonl").read_text().splitlines()]


def _out(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"train-{job}.out").read_text(errors="replace")


@pytest.fixture(scope="module")
def pipeline(cluster, tmp_path_factory):
    """The demo pipeline as Slurm jobs: prep (tokenizer, 2-task array, merge) then training."""
    base = tmp_path_factory.mktemp("slurm_pipeline")
    corpus = base / "corpus"
    corpus.mkdir()
    lines = (REPO / "data_prep" / "corpus" / "corpus.jsonl").read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (corpus / "part0.jsonl").write_text("".join(lines[:half]))
    (corpus / "part1.jsonl").write_text("".join(lines[half:]))
    data, run_dir = base / "data", base / "run"
    t0 = time.time()
    _submit(cluster, "prep", f"slurm.prep.inputs=[{corpus}/*.jsonl]", "slurm.prep.vocab_size=512",
            "slurm.prep.cpus_per_task=1", "slurm.prep.time=00:10:00", *_train_overrides(data, run_dir))
    jobs = _submissions(run_dir)[-1]["jobs"]
    states = cluster.wait_jobs(list(jobs.values()), timeout=300)
    return {"base": base, "data": data, "run_dir": run_dir, "jobs": jobs, "states": states,
            "seconds": time.time() - t0}


def test_prep_and_training_pipeline_as_slurm_jobs(pipeline, cluster):
    from mlflow.tracking import MlflowClient

    data, run_dir, jobs, states = pipeline["data"], pipeline["run_dir"], pipeline["jobs"], pipeline["states"]
    sd = run_dir / "slurm"
    assert set(jobs) == {"tokenizer", "tokenize", "merge", "train"}
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in sd.glob("*.out")}
    assert all(s == ["COMPLETED"] * len(s) for s in states.values()), (states, logs)
    assert len(states[jobs["tokenize"]]) == 2  # one array task per input shard
    # the dependency chain: each stage started only after the previous one ended
    info = {k: cluster.job_info(v) for k, v in jobs.items() if k != "tokenize"}
    assert info["merge"]["StartTime"] >= info["tokenizer"]["EndTime"]
    assert info["train"]["StartTime"] >= info["merge"]["EndTime"]

    assert (data / "tok.model").is_file()
    assert sorted(p.name for p in (data / "corpus_shards").iterdir()) == \
        ["shard_00000.bin", "shard_00000.idx", "shard_00001.bin", "shard_00001.idx"]
    assert (data / "corpus.bin").is_file() and (data / "corpus.idx").is_file()

    assert CheckpointDir(run_dir / "checkpoints").find_latest()[0] == MAX_STEPS
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1)) and steps[MAX_STEPS] < steps[1]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mod-train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "lm loss")) == \
        list(range(1, MAX_STEPS + 1))
    # the rendered scripts are kept; per-rank logs from torchrun
    for name in ("train.sbatch", "node.sh", "prep_tokenizer.sbatch", "prep_tokenize.sbatch", "prep_merge.sbatch"):
        assert (sd / name).is_file()
    for rank in (0, 1):
        assert list((run_dir / "logs").glob(f"job{jobs['train']}_restart0/node0/*/attempt_0/{rank}/stderr.log"))
    print(f"\npipeline on Slurm: {pipeline['seconds']:.0f} s")


def test_finished_shards_are_not_redone(pipeline, cluster):
    shards = pipeline["data"] / "corpus_shards"
    sd = pipeline["run_dir"] / "slurm"
    kept = (shards / "shard_00000.bin").stat().st_mtime_ns
    original = (shards / "shard_00001.bin").read_bytes()
    for ext in (".bin", ".idx"):
        (shards / f"shard_00001{ext}").unlink()
    # The whole array again, as after a partial failure: task 0 skips, task 1 rebuilds its shard.
    r = cluster.run("sbatch", "--parsable", "--array=0-1", str(sd / "prep_tokenize.sbatch"))
    job = r.stdout.strip().split(";")[0]
    states = cluster.wait_jobs([job], timeout=120)
    assert states[job] == ["COMPLETED", "COMPLETED"], states
    assert "is complete: skipping" in (sd / f"prep_tokenize-{job}_0.out").read_text()
    assert (shards / "shard_00000.bin").stat().st_mtime_ns == kept
    assert (shards / "shard_00001.bin").read_bytes() == original


def test_preemption_checkpoints_requeues_and_resumes_identically(pipeline, cluster):
    from mlflow.tracking import MlflowClient

    run_dir = pipeline["base"] / "preempted"
    t0 = time.time()
    _submit(cluster, *_train_overrides(pipeline["data"], run_dir))
    job = _submissions(run_dir)[-1]["job"]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        assert cluster.job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _out(run_dir, job)
        time.sleep(0.1)
    else:
        pytest.fail("training did not start in time:\n" + _out(run_dir, job)[-3000:])
    # Slurm's warning signal, as --signal=B:USR1@N sends it: to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    deadline = time.time() + 240
    while time.time() < deadline:
        info = cluster.job_info(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and int(info.get("Restarts", 0)) >= 1:
            break
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), _out(run_dir, job)[-4000:]
        time.sleep(0.5)
    out = _out(run_dir, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, out[-4000:])

    stopped = re.search(r"stopped by SIGUSR1 at step (\d+) \(checkpoint saved\)", out)
    assert stopped, out[-4000:]
    k = int(stopped.group(1))
    assert 10 <= k < MAX_STEPS
    assert f"resumed from {run_dir}/checkpoints/iter_{k:07d} at step {k}" in out
    assert "requeue-check: checkpoint step None -> %d" % k in out
    history = json.loads((run_dir / "slurm" / "requeue_state.json").read_text())["history"]
    assert [(h["event"], h["restart"], h["step"]) for h in history] == \
        [("start", 0, None), ("requeue", 0, k), ("start", 1, k)]

    # Identical per-step losses to the uninterrupted run of the pipeline test.
    reference, resumed = losses(pipeline["run_dir"]), losses(run_dir)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    assert resumed == reference
    assert CheckpointDir(run_dir / "checkpoints").find_latest()[0] == MAX_STEPS
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mod-train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "the requeued job continues the same MLflow run"
    print(f"\npre-empted at step {k}, requeued, finished in {time.time() - t0:.0f} s")


def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path, tiny_data):
    """No Slurm needed: SIGUSR1 to rank 1 only; the per-step all-reduce makes rank 0 stop too."""
    import psutil

    from tests.helpers_train import kill_tree
    from tests.helpers_train import run_dir_overrides, tiny_overrides

    run_dir = tmp_path / "run"
    ov = tiny_overrides(tiny_data, "train.max_steps=400", "checkpoint.save_interval=1000") + run_dir_overrides(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "mod_train.train", *ov]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
            assert time.time() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children() if "mod_train.train" in " ".join(p.cmdline())]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=180)
    finally:
        kill_tree(proc.pid)
    m = re.search(r"stopped by a signal on another rank at step (\d+)", out)
    assert m, out[-4000:]
    k = int(m.group(1))
    assert k < 400 and max(losses(run_dir)) == k
    assert CheckpointDir(run_dir / "checkpoints").find_latest()[0] == k
    assert "exitcode  : 124" in out  # both ranks exit with the pre-emption code (torchrun reports it)
