"""End-to-end: kill -9 during a checkpoint save, and the `make demo` pipeline on the bundled corpus."""

import os
import re
import subprocess
import sys
import time

import pytest

from mod_train.checkpoint.layout import CheckpointDir, read_metadata
from tests.helpers_train import REPO, free_port, kill_tree, losses, run_dir_overrides, tiny_overrides


def _train_cmd(overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "mod_train.train", *overrides]


# Enough steps for the watcher to catch a save in the act (almost always the third; every step
# saves); the resumed run pays a save per step left, so no more than that.
KILL_RUN_STEPS = 12


@pytest.mark.slow
def test_kill_minus_9_during_save_keeps_previous_checkpoint(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    # A wider model makes each save take long enough to be caught in the act; save every step.
    ov = tiny_overrides(tiny_data, "model.hidden_size=256", "model.num_attention_heads=4",
                        "checkpoint.save_interval=1", "checkpoint.keep_last=2", f"train.max_steps={KILL_RUN_STEPS}",
                        "parallel.zero_stage=2") + run_dir_overrides(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(ov), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = run_dir / "checkpoints"
    killed_during = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            staging = sorted(ckpt.glob(".staging_iter_*")) if ckpt.is_dir() else []
            done = CheckpointDir(ckpt).list_complete() if ckpt.is_dir() else []
            if staging and len(done) >= 2:
                kill_tree(proc.pid)  # the whole job, mid-save
                killed_during = staging[-1].name
                break
            time.sleep(0.002)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert killed_during, "never caught a save in progress"
    staged_step = int(killed_during.rsplit("_", 1)[1])

    latest = CheckpointDir(ckpt).find_latest()
    assert latest is not None and latest[0] < staged_step  # the interrupted save is not taken for complete
    assert read_metadata(latest[1])["train_state"]["step"] == latest[0]

    # The previous checkpoint loads and training finishes from it.
    r = subprocess.run(_train_cmd(ov), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {latest[1]} at step {latest[0]}" in r.stdout, r.stdout[-3000:]
    steps = losses(run_dir)
    assert max(steps) == KILL_RUN_STEPS and all(s in steps for s in range(latest[0] + 1, KILL_RUN_STEPS + 1))


@pytest.mark.slow
def test_kill_minus_9_during_a_background_save_keeps_previous_checkpoint(tmp_path):
    """checkpoint.async_save: the job is killed while the writer of step 6's checkpoint is in flight
    (held back by train.inject.checkpoint_write_delay_s, so the moment is deterministic): the
    checkpoint of step 3 stays latest, the next start removes the stale staging directory and
    finishes from step 3. One rank (the commit agreement of two is test_exact_resume's zero3_async)."""
    from mod_train.distributed.world import free_port

    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    args = ["data=mock", "model.vocab_size=256", "tracking.enabled=false", "train.max_steps=8",
            "train.log_interval=1", "checkpoint.save_interval=3", "checkpoint.keep_last=2",
            "checkpoint.async_save=true", f"train.run_dir={run_dir}"]

    def train(*extra):
        env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
        env.pop("MOD_TRAIN_RUN_LOCK", None)
        return [sys.executable, "-m", "mod_train.train", *args, *extra], env

    cmd, env = train("train.inject.checkpoint_write_delay_s=6")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staging = ckpt / ".staging_iter_0000006"
    deadline = time.time() + 240
    try:
        # save(6) commits step 3 (waiting for its writer) before it creates the staging directory of 6
        while time.time() < deadline and proc.poll() is None and not staging.is_dir():
            time.sleep(0.02)
        assert staging.is_dir(), "the save of step 6 never started"
        assert CheckpointDir(ckpt).find_latest()[0] == 3
        kill_tree(proc.pid)  # the job and its writer processes, while step 6's writer waits
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert not (staging / "model" / "metadata.json").exists()  # its write had not finished
    latest = CheckpointDir(ckpt).find_latest()
    assert latest[0] == 3 and read_metadata(latest[1])["train_state"]["step"] == 3

    cmd, env = train()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"resumed from {latest[1]} at step 3" in r.stdout, r.stdout[-3000:]
    assert "committed checkpoint" in r.stdout
    assert [s for s, _ in CheckpointDir(ckpt).list_complete()] == [6, 8]
    assert not list(ckpt.glob(".staging_*"))
    steps = losses(run_dir)
    assert all(s in steps for s in range(1, 9))


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    """Tokenizer -> indexed data -> 2-process training that stops half-way -> resume -> MLflow."""
    from mlflow.tracking import MlflowClient

    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    r = subprocess.run([sys.executable, "-m", "launch.demo", "--steps", "20", "--vocab-size", "512",
                        "--data-dir", str(data_dir), "--run-dir", str(run_dir), f"tracking.tracking_uri={store}",
                        "train.log_interval=1", "checkpoint.save_interval=5"],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**{k: v for k, v in os.environ.items() if k != "MOD_TRAIN_LOGLEVEL"},
                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A quiet console: only rank 0 prints (each step's line once), the dependencies' warnings are
    # summed up in one line per program run, no line repeats.
    console = (r.stdout + r.stderr).splitlines()
    assert not [line for line in console if "Warning" in line], r.stderr[-3000:]
    assert sum(" iteration " in line for line in console) == 20
    summaries = [line for line in console if "known dependency warnings" in line]
    assert 1 <= len(summaries) <= 3  # two training invocations and mod-generate
    # The fused-kernel decisions are made per program run (a resumed run may land on other nodes):
    # one line per training invocation, printed by rank 0 only.
    fusions = [line for line in console if line.startswith("fusions: ")]
    assert len(fusions) == 2, fusions
    lines = [line for line in console if line.strip() and line not in summaries + fusions
             and not re.fullmatch(r"\s+\(\d+\.\d s\)", line)]  # the demo's timings may coincide
    assert not {line for line in lines if lines.count(line) > 1}, console
    assert (data_dir / "tokenizer.model").is_file()
    assert (data_dir / "corpus_text_document.bin").is_file() and (data_dir / "corpus_text_document.idx").is_file()
    latest = CheckpointDir(run_dir / "checkpoints").find_latest()
    assert latest and latest[0] == 20
    assert "resumed from" in r.stdout and "at step 10" in r.stdout
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, 21))
    assert steps[20] < steps[1]  # it learns

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("mod-train").experiment_id])
    assert len(runs) == 1, "the resumed invocation must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "lm loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    assert run.data.params["parallel.zero_stage"] == "1" and run.data.params["train.max_steps"] == "20"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "tokenizer.model" in artifacts and "resolved_config.yaml" in artifacts
