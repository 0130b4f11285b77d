"""Helpers for tests that train: tiny-run overrides and torchrun launches of in-repo drivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from mod_train.distributed.world import free_port  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]


def run_dir_overrides(run_dir: Path) -> List[str]:
    """Where a run writes: its directory and a local MLflow store inside it."""
    return [f"train.run_dir={run_dir}", f"tracking.tracking_uri=sqlite:///{run_dir}/mlflow.db"]


def tiny_overrides(data: Dict[str, str], *extra: str) -> List[str]:
    """A tiny model on the test corpus, logging every step."""
    return [
        f"data.tokenizer_model={data['tokenizer']}",
        f"data.paths=[{data['prefix']}]",
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
        "parallel.micro_batch_size=2",
        "train.log_interval=1", "train.eval_interval=1000", "train.max_steps=20",
        "checkpoint.save_interval=5", "checkpoint.keep_last=3",
        "optim.warmup_steps=3",
        *extra,
    ]


def torchrun(nproc: int, module_or_args: Sequence[str], timeout: int = 600, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *module_or_args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=run_env)


def losses(run_dir: Path, key: str = "lm loss") -> Dict[int, float]:
    """Per-step values from a run's metrics.jsonl (rows of a step merged: training and evaluation;
    a step written twice by a resumed run keeps its last value)."""
    from mod_train.tracking.metrics_jsonl import metrics_by_step

    by_step = metrics_by_step(run_dir / "metrics.jsonl")
    return {step: row[key][0] for step, row in sorted(by_step.items()) if key in row}


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def kill_processes(procs) -> None:
    """SIGKILL psutil processes (already gone ones are skipped) and wait for them."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun puts workers in new sessions,
    so killing its process group alone leaves the ranks running)."""
    import psutil

    try:
        kill_processes(psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)])
    except psutil.NoSuchProcess:
        return
