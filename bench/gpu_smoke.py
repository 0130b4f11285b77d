"""One smoke run of the GPU check (bench/gpu_suite.py): train a preset for --steps steps on synthetic
tokens in this process, with mod-train's own Trainer, and count the host syncs of every step.

    python bench/gpu_smoke.py --model tiny_mod --steps 30 --log-interval 10 --run-dir /tmp/smoke

On CUDA, syncs are what ``torch.cuda.set_sync_debug_mode("warn")`` reports (each synchronizing
CUDA call warns), switched on after the first step (allocation, warm-up) and attributed to the step
being run; the log line of a logged step is counted with that step. The trainer syncs on purpose on
logged steps only (StepMetrics.materialize), so ``syncs_unlogged`` should be 0 apart from what the
optimizer does on its own. Without CUDA there is nothing to count (``syncs_counted`` false).
Prints one ``RESULT {json}`` line: the losses at logged steps, sync counts, step times.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SyncCounter:
    """Counts CUDA sync warnings per step while active (``step`` is set by the caller)."""

    def __init__(self) -> None:
        self.step = 0
        self.per_step: Dict[int, int] = collections.Counter()
        self.where: Dict[str, int] = collections.Counter()
        self._previous = None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            self.per_step[self.step] += 1
            self.where[f"{filename}:{lineno}"] += 1
        elif self._previous is not None:
            self._previous(message, category, filename, lineno, file, line)

    def start(self) -> None:
        warnings.simplefilter("always")  # every sync, not once per place
        self._previous, warnings.showwarning = warnings.showwarning, self._show
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        if self._previous is not None:
            warnings.showwarning, self._previous = self._previous, None


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--run-dir", required=True)
    p.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = p.parse_args(argv)

    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.trainer import build_run

    cfg = to_config(compose([
        f"model={args.model}", "data=mock", f"model.vocab_size={args.vocab}", f"train.max_steps={args.steps}",
        f"train.log_interval={args.log_interval}", "train.eval_interval=1000000", "checkpoint.save=false",
        "tracking.enabled=false", f"parallel.micro_batch_size={args.micro_batch}",
        f"train.run_dir={args.run_dir}", *args.overrides]))
    training = build_run(cfg, validate(cfg))
    trainer = training.trainer
    cuda = torch.cuda.is_available()
    counter = SyncCounter()
    train_step = trainer.runner.train_step

    def counted_step(batches, *args, **kwargs):
        # Attribute what follows (this step and, if logged, its log line) to the step's number.
        counter.step = trainer.state.step + 1
        if cuda and counter.step == 2:
            torch.cuda.synchronize()
            counter.start()
        return train_step(batches, *args, **kwargs)

    trainer.runner.train_step = counted_step
    try:
        trainer.fit()
    finally:
        if cuda:
            counter.stop()
        training.close()
    rows = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = {s for s in range(1, args.steps + 1) if s % args.log_interval == 0 or s == args.steps}
    unlogged = {s: n for s, n in counter.per_step.items() if s not in logged and s > 1}
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16" if training.derived.bf16 else "fp32",
        "steps": args.steps, "loss": {str(r["step"]): r["lm loss"] for r in rows if "lm loss" in r},
        "ms_per_step": [r["elapsed time per iteration (ms)"] for r in rows if "elapsed time per iteration (ms)" in r],
        "syncs_counted": cuda,
        "syncs_unlogged": sum(unlogged.values()),
        "syncs_unlogged_steps": len(unlogged),
        "syncs_logged": sum(n for s, n in counter.per_step.items() if s in logged),
        "syncs_where": dict(collections.Counter(counter.where).most_common(8)),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
