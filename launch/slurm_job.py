"""What a running mod-train Slurm job calls from its batch script (stdlib only, so any python3 on
the batch host can run it, even when training runs in a container)::

    python -m launch.slurm_job job-start     --run-dir RUN_DIR   # record the checkpoint step at start
    python -m launch.slurm_job requeue-check --run-dir RUN_DIR   # exit 0: requeue, 1: do not

A job requeues after Slurm's pre-emption warning, or when mod-train's step watchdog stopped a hung
run (it writes ``<run_dir>/watchdog/rank_*.txt`` and exits non-zero; torchrun reports any failed rank
as exit code 1, so the dump written since this job run started is the evidence); any other failure
ends the job.

``<run_dir>/slurm/job.json`` (written by mod-submit) gives train.max_steps, the checkpoint directory
and slurm.max_requeues; ``requeue_state.json`` keeps the start step of the current run, the count of
consecutive runs without progress and the history of starts, requeues and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

JOB_FILE = "job.json"
REQUEUE_STATE_FILE = "requeue_state.json"
WATCHDOG_DIR = "watchdog"  # mirrors mod_train.callbacks.watchdog.WATCHDOG_DIR (stdlib-only module)


def latest_step(checkpoint_dir: Path) -> Optional[int]:
    from mod_train.checkpoint.layout import CheckpointDir

    found = CheckpointDir(checkpoint_dir).find_latest() if Path(checkpoint_dir).is_dir() else None
    return found[0] if found else None


def _load(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _save(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def job_start(run_dir: Path) -> dict:
    """Record the latest checkpoint step as this job run starts (requeue-check compares with it)."""
    sd = Path(run_dir) / "slurm"
    job = _load(sd / JOB_FILE, {})
    state = _load(sd / REQUEUE_STATE_FILE, {"no_progress": 0, "history": []})
    step = latest_step(Path(job.get("checkpoint_dir", Path(run_dir) / "checkpoints")))
    state["start_step"] = step
    state["start_time"] = time.time()
    state["history"].append({"event": "start", "job": os.environ.get("SLURM_JOB_ID"),
                             "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "step": step,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    sd.mkdir(parents=True, exist_ok=True)
    _save(sd / REQUEUE_STATE_FILE, state)
    return state


def watchdog_fired(run_dir: Path, since: Optional[float]) -> bool:
    """Whether mod-train's step watchdog wrote a stack dump since ``since`` (unix time; None: ever)."""
    dumps = list((Path(run_dir) / WATCHDOG_DIR).glob("rank_*.txt"))
    return any(since is None or d.stat().st_mtime >= since for d in dumps)


def requeue_check(run_dir: Path, exit_code: Optional[int] = None, preempted: bool = True) -> Tuple[bool, str]:
    """Whether a pre-empted (or watchdog-stopped) job should requeue itself: not when training is
    finished, nor after ``max_requeues`` consecutive runs that ended without a newer checkpoint than
    they started from, nor after a failure that was neither."""
    sd = Path(run_dir) / "slurm"
    job = _load(sd / JOB_FILE, {})
    state = _load(sd / REQUEUE_STATE_FILE, {"no_progress": 0, "history": []})
    if not preempted and not watchdog_fired(run_dir, state.get("start_time")):
        why = (f"training exited with code {exit_code} without a pre-emption warning or a watchdog stop: "
               f"not requeueing (see the job's log)")
        state["history"].append({"event": "stop", "job": os.environ.get("SLURM_JOB_ID"), "exit_code": exit_code,
                                 "reason": why, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _save(sd / REQUEUE_STATE_FILE, state)
        return False, why
    step = latest_step(Path(job.get("checkpoint_dir", Path(run_dir) / "checkpoints")))
    max_steps = job.get("max_steps")
    max_requeues = int(job.get("max_requeues", 3))
    start = state.get("start_step")
    progress = step is not None and (start is None or step > start)
    state["no_progress"] = 0 if progress else int(state.get("no_progress", 0)) + 1
    if max_steps is not None and step is not None and step >= max_steps:
        ok, why = False, f"training is finished (checkpoint step {step} >= train.max_steps {max_steps})"
    elif state["no_progress"] > max_requeues:
        ok, why = False, (f"no new checkpoint in {state['no_progress']} consecutive runs (latest step {step}); "
                          f"slurm.max_requeues={max_requeues} reached: not requeueing")
    else:
        ok = True
        why = (f"checkpoint step {start} -> {step}" if progress else
               f"no progress (step {step}), requeue {state['no_progress']} of at most {max_requeues} without progress")
    state["history"].append({"event": "requeue" if ok else "stop", "job": os.environ.get("SLURM_JOB_ID"),
                             "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "step": step,
                             "exit_code": exit_code, "reason": why, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _save(sd / REQUEUE_STATE_FILE, state)
    return ok, why


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slurm_job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("job-start")
    a.add_argument("--run-dir", required=True)
    b = sub.add_parser("requeue-check")
    b.add_argument("--run-dir", required=True)
    b.add_argument("--exit-code", type=int, default=None)
    b.add_argument("--preempted", type=int, default=1,
                   help="0: no pre-emption warning came; requeue only if the step watchdog stopped the run")
    args = p.parse_args(argv)
    if args.cmd == "job-start":
        state = job_start(Path(args.run_dir))
        print(f"latest checkpoint at start: step {state['start_step']}", flush=True)
        return 0
    ok, why = requeue_check(Path(args.run_dir), args.exit_code, preempted=bool(args.preempted))
    print(f"requeue-check: {why}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
