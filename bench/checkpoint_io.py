"""What a checkpoint save costs the training loop: seconds blocked, synchronous vs background
(``checkpoint.async_save``), the time until the checkpoint is committed, and the bytes a save
writes against the bytes of model + optimizer state.

    .venv/bin/python bench/checkpoint_io.py [--layers 8] [--hidden 512] [--saves 2] [--zero 1]

One process (a world of one, gloo), mod-train's own run (``trainer.build_run``: megatron-core GPT,
DeepSpeed ZeRO engine, ``data=mock``), three modes in turn:

* ``sync, two copies``: ``checkpoint.deepspeed_files=true`` -- DeepSpeed's files and the
  layout-free ``model/`` + ``optimizer/`` (what every save wrote before the option existed);
* ``sync, one copy``: the default -- ``model/`` + ``optimizer/`` + ``rng/``;
* ``async, one copy``: ``checkpoint.async_save=true`` -- the same files, written by a forked process
  while the loop trains on; committed at the first step after the write has finished.

Per save: ``blocked s`` = seconds the loop spent inside the save call plus every poll until the
commit (the commit itself, checksums + fsync + rename, runs in the poll that finds the write
done); ``to commit s`` = from the start of the save to the commit; ``steps meanwhile`` = training
steps run while the background write was in flight, and their mean time against a step without a
write in flight. ``written MB`` = the bytes of the committed ``iter_*`` directory; ``state MB`` =
parameters (fp32) + optimizer state as DeepSpeed holds it (fp32 master + two Adam moments).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES: Dict[str, List[str]] = {
    "sync, two copies": ["checkpoint.deepspeed_files=true"],
    "sync, one copy": [],
    "async, one copy": ["checkpoint.async_save=true"],
}


def dir_bytes(path: Path) -> Dict[str, int]:
    """Bytes per top-level entry of a checkpoint directory."""
    out: Dict[str, int] = {}
    for p in path.rglob("*"):
        if p.is_file():
            top = p.relative_to(path).parts[0]
            out[top] = out.get(top, 0) + p.stat().st_size
    return out


def measure(mode: str, base: List[str], run_dir: Path, saves: int, gap_steps: int) -> List[dict]:
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.trainer import build_run

    cfg = to_config(compose(base + MODES[mode] + [f"train.run_dir={run_dir}"]))
    run = build_run(cfg, validate(cfg))
    trainer = run.trainer
    checkpoints = trainer.checkpoints
    number = 0

    def step() -> float:
        nonlocal number
        number += 1
        start = time.perf_counter()
        trainer.runner.train_step(trainer.train_batches, trainer.policy, number, 1.0)
        trainer.state.step = number
        trainer.state.consumed_train_samples += run.derived.global_batch_size
        return time.perf_counter() - start

    quiet = [step() for _ in range(3)][1:]  # the first step builds Adam's state
    rows = []
    for _ in range(saves):
        start = time.perf_counter()
        path = checkpoints.save(trainer.state)
        in_save = blocked = time.perf_counter() - start
        meanwhile: List[float] = []
        pending = checkpoints.checkpointer.background is not None
        while pending:
            meanwhile.append(step())
            t = time.perf_counter()
            committed = checkpoints.checkpointer.poll()
            blocked += time.perf_counter() - t
            pending = committed is None
        to_commit = time.perf_counter() - start
        rows.append({"mode": mode, "save": len(rows) + 1, "in_save": in_save, "blocked": blocked, "to_commit": to_commit, "meanwhile": meanwhile,
                     "quiet": sum(quiet) / len(quiet), "bytes": dir_bytes(path), "step": trainer.state.step})
        for _ in range(gap_steps):
            quiet.append(step())
    params = sum(p.numel() for p in trainer.checkpoints.engine.module.parameters())
    for r in rows:
        r["params"] = params
    trainer.checkpoints.finish()
    run.close("FINISHED", keep_process_group=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--gap-steps", type=int, default=1, help="steps between saves")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    base = ["data=mock", "model=tiny", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            "model.num_attention_heads=8", "model.seq_length=128", "model.vocab_size=512",
            "parallel.micro_batch_size=1", "parallel.global_batch_size=1", f"parallel.zero_stage={args.zero}",
            "tracking.enabled=false", "train.max_steps=100000", "checkpoint.save_interval=100000",
            "checkpoint.keep_last=100", "train.log_interval=100000"]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="checkpoint_io_"))
    rows = []
    try:
        for i, mode in enumerate(MODES):
            rows += measure(mode, base, root / f"run{i}", args.saves, args.gap_steps)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    mb = 2 ** 20
    params = rows[0]["params"]
    state = params * (4 + 4 + 8)  # fp32 weights + DeepSpeed's fp32 master + two Adam moments
    print(f"model: {args.layers} layers, hidden {args.hidden}, {params / 1e6:.1f} M parameters, ZeRO-{args.zero}, "
          f"one rank; state = weights {params * 4 / mb:.0f} MB + fp32 master {params * 4 / mb:.0f} MB + Adam "
          f"moments {params * 8 / mb:.0f} MB = {state / mb:.0f} MB")
    sync_blocked = {r["save"]: r["blocked"] for r in rows if r["mode"] == "sync, two copies"}
    print(f"| mode | save | blocked s (in save + polls) | x two-copy sync | to commit s | steps meanwhile "
          f"(mean s) | quiet step s | written MB | x state | per entry MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        written = sum(r["bytes"].values())
        during = (f"{len(r['meanwhile'])} ({sum(r['meanwhile']) / len(r['meanwhile']):.2f})"
                  if r["meanwhile"] else "-")
        parts = ", ".join(f"{k} {v / mb:.0f}" for k, v in sorted(r["bytes"].items()) if v >= mb // 10)
        print(f"| {r['mode']} | {r['save']} | {r['blocked']:.2f} ({r['in_save']:.2f} + "
              f"{r['blocked'] - r['in_save']:.2f}) | {r['blocked'] / sync_blocked[r['save']]:.2f} | "
              f"{r['to_commit']:.2f} | {during} | {r['quiet']:.2f} | {written / mb:.0f} | {written / state:.2f} | "
              f"{parts} |")


if __name__ == "__main__":
    main()
