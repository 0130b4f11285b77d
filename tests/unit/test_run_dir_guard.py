"""One job per run directory, and no rank outliving its launcher.

The lock itself is tested in-process (owner alive / gone / PID reused / another host / a requeued
Slurm job / a launcher's children joining it); one real ``mod-launch`` of 2 ranks then shows a
second launch (and a direct ``python -m mod_train.train``) refused with the owner named, and a
SIGKILL of the launcher's process group leaving no rank alive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mod_train.run_lock import LOCK_ENV, LOCK_FILE, RunDirLocked, RunLock

REPO = Path(__file__).resolve().parents[2]


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from mod_train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_owner_is_refused_and_named_and_a_dead_one_is_broken(tmp_path):
    child = _hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"PID {child.pid}" in msg and socket.gethostname() in msg and "in use by another job" in msg
    finally:
        child.kill()
        child.wait()
    lock = RunLock(tmp_path).acquire()  # the owner is provably gone: same host, PID dead
    assert json.loads((tmp_path / LOCK_FILE).read_text())["holders"][0]["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def _write_lock(run_dir: Path, **fields) -> None:
    owner = {"host": socket.gethostname(), "holders": [{"pid": os.getpid(), "start_time": None}],
             "slurm_job_id": None, "slurm_restart_count": 0, "since": "then", "command": "mod-launch ..."}
    owner.update(fields)
    (run_dir / LOCK_FILE).write_text(json.dumps(owner))


def test_a_lock_from_another_host_is_never_broken_and_says_how_to_break_it(tmp_path):
    _write_lock(tmp_path, host="node-17", holders=[{"pid": 4242, "start_time": "1"}], slurm_job_id="991")
    with pytest.raises(RunDirLocked) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "node-17" in msg and "4242" in msg and "Slurm job 991" in msg and f"delete {tmp_path / LOCK_FILE}" in msg


def test_a_reused_pid_counts_as_gone(tmp_path):
    _write_lock(tmp_path, holders=[{"pid": os.getpid(), "start_time": "not-my-start-time"}])
    RunLock(tmp_path).acquire().release()


def test_a_requeued_slurm_job_breaks_the_lock_of_its_earlier_incarnation(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node-03", holders=[{"pid": 1, "start_time": None}], slurm_job_id="77",
                slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path).acquire().release()


def test_the_launchers_children_join_its_lock_and_only_the_launcher_releases_it(tmp_path, monkeypatch):
    launcher = RunLock(tmp_path).acquire()
    env = launcher.export_env({})
    code = ("import os, sys, json; from mod_train.run_lock import RunLock; l = RunLock(sys.argv[1]).acquire(); "
            "l.release(); print(len(json.load(open(os.path.join(sys.argv[1], '.run.lock')))['holders']))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"  # the child added its PID; its release left the lock in place
    assert (tmp_path / LOCK_FILE).exists()
    launcher.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert LOCK_ENV in env


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _tiny_overrides(run: Path):
    return ["data=mock", "model.vocab_size=256", "tracking.enabled=false", f"train.run_dir={run}",
            "train.max_steps=100000", "train.log_interval=1", "train.eval_interval=100000", "checkpoint.save=false",
            "model.num_layers=1", "model.hidden_size=16", "model.num_attention_heads=2", "model.seq_length=16"]


def _launch_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(LOCK_ENV, None)
    return env


def _ranks_when_training(launcher: subprocess.Popen, run: Path, timeout: float = 300):
    """The launcher's two rank processes, once both train (past their start: parent-death signal
    set, process group up, a step logged)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        time.sleep(0.5)
    assert (run / "metrics.jsonl").is_file(), "the launch never trained"
    ranks = [p for p in _descendants(launcher.pid)
             if "mod_train.train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
    assert len(ranks) == 2, [p.cmdline() for p in _descendants(launcher.pid)]
    return ranks


def test_second_launch_is_refused_and_no_rank_outlives_a_killed_or_stopped_launcher(tmp_path):
    """Two launches at once (their start-up costs overlap). B gets SIGTERM (the launcher alone, a
    job's termination) as soon as its ranks train: it stops its ranks and releases its lock, and no
    longer takes the CPU from A's start. A is the target of a second launch and a direct
    mod_train.train (both refused, owner named, started together), then its process group is
    SIGKILLed. A's ranks sleep from their second step on (an injected hang): alive, holding the
    lock, but idle while the refused commands start (the kill does not care what they do)."""
    import psutil

    runs = {k: tmp_path / k for k in "AB"}
    idle = {"A": ["train.inject.hang_at_step=2"], "B": []}
    procs = {k: subprocess.Popen([sys.executable, "-m", "launch.local", "--nproc", "2", *_tiny_overrides(run),
                                  *idle[k]],
                                 cwd=REPO, env=_launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True) for k, run in runs.items()}
    ranks, refused = {}, {}
    try:
        ranks["B"] = _ranks_when_training(procs["B"], runs["B"])
        os.kill(procs["B"].pid, signal.SIGTERM)  # B: the launcher alone; its ranks stop at the end of a step
        assert procs["B"].wait(timeout=120) != 0

        ranks["A"] = _ranks_when_training(procs["A"], runs["A"])
        first = procs["A"]
        refused = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
                   for name, cmd, env in (
                       ("second", [sys.executable, "-m", "launch.local", "--nproc", "2", *_tiny_overrides(runs["A"])],
                        _launch_env()),
                       ("direct", [sys.executable, "-m", "mod_train.train", *_tiny_overrides(runs["A"])],
                        {**_launch_env(), "RANK": "0", "WORLD_SIZE": "1"}))}
        err = {name: p.communicate(timeout=120)[1] for name, p in refused.items()}
        assert refused["second"].returncode == 2, err["second"][-3000:]
        assert "in use by another job" in err["second"] and f"PID {first.pid}" in err["second"], err["second"]
        assert socket.gethostname() in err["second"]
        assert refused["direct"].returncode == 2 and f"PID {first.pid}" in err["direct"], err["direct"][-3000:]

        os.killpg(first.pid, signal.SIGKILL)  # A: the launcher's whole process group, as a user would
        first.wait()
    finally:
        for proc in refused.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for k in "AB":
        gone, alive = psutil.wait_procs(ranks.get(k, []), timeout=60)
        assert not alive, f"launch {k}: ranks outlived their launcher: {[p.pid for p in alive]}"
    assert not (runs["B"] / LOCK_FILE).exists(), "a stopped launcher releases its lock"
    RunLock(runs["A"]).acquire().release()  # a killed one's lock is broken: its owners are gone


def test_a_process_that_asked_to_die_with_its_parent_does_when_the_parent_is_killed(tmp_path):
    """The mechanism between mod-launch and torchrun (SIGTERM: torchrun stops its ranks) and between
    torchrun and the ranks (SIGKILL): the parent gets SIGKILL, the child must not survive it."""
    import psutil

    parent_code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; "
        "from mod_train.distributed.parent_death import die_with_parent; import signal; "
        "die_with_parent(signal.SIGTERM); print(1, flush=True); time.sleep(600)'], stdout=subprocess.PIPE)\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    gone, alive = psutil.wait_procs([child], timeout=20)
    assert not alive, "the child outlived its SIGKILLed parent"
