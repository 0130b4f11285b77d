"""Dense -> MoD upcycling on the demo corpus: the loss of a MoD twin started from a dense checkpoint
(every dense weight, routers at init, capacity schedule 1.0 -> target) against the dense model
continuing and a MoD twin trained from scratch, for the same steps on the same data.

    python bench/upcycle.py [--base-steps 60] [--steps 60] [--schedule-steps 30] [--phases 3]

1. the dense base: ``model=tiny`` trained --base-steps steps from scratch;
2. exported with ``mod-export --format hf`` and started from with ``checkpoint.init_from=hf:<dir>``:
   ``dense_continue`` (model=tiny) and ``mod_upcycled`` (model=tiny_mod +
   ``model.mod.capacity_schedule``); ``mod_scratch`` (model=tiny_mod) starts from a random init.
All three run --steps steps from the first sample (a fresh run; the base saw the same data), seed
and LR schedule alike. Writes bench/results/upcycle_cpu.md (table of training losses, validation
loss at the end, causal for MoD) and prints a RESULT json line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from common import REPO, run_mod_train


def prep_demo_data(data: Path) -> List[str]:
    corpus = REPO / "data_prep" / "corpus" / "corpus.jsonl"
    tok, prefix = data / "tokenizer.model", data / "corpus_text_document"
    py = sys.executable
    if not tok.is_file():
        subprocess.run([py, "-m", "data_prep.train_tokenizer", "--input", str(corpus), "--output-prefix",
                        str(data / "tokenizer"), "--vocab-size", "2000"], check=True, cwd=REPO, capture_output=True)
    if not Path(str(prefix) + ".idx").is_file():
        subprocess.run([py, "-m", "data_prep.tokenize_corpus", "--input", str(corpus), "--tokenizer-model", str(tok),
                        "--output-prefix", str(prefix), "--workers", "1"], check=True, cwd=REPO, capture_output=True)
    return [f"data.tokenizer_model={tok}", f"data.paths=[{prefix}]"]


def losses(rows: List[dict], key: str) -> Dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if key in r and "step" in r}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-steps", type=int, default=60)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--schedule-steps", type=int, default=30)
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="upcycle_"))
    data = prep_demo_data(work / "data")
    common = [*data, "train.log_interval=5", "train.eval_iters=4", "checkpoint.keep_last=1",
              "parallel.micro_batch_size=4", "optim.warmup_steps=5", "train.seed=1"]

    def train(name: str, steps: int, *extra: str) -> List[dict]:
        run = work / name
        rc, last, rows = run_mod_train([*common, f"train.max_steps={steps}", f"train.eval_interval={steps}",
                                        f"checkpoint.save_interval={steps}",
                                        f"tracking.tracking_uri=sqlite:///{run}/mlflow.db", *extra], run)
        if rc != 0:
            raise SystemExit(f"{name} failed: {last}")
        return rows

    train("dense_base", a.base_steps, "model=tiny")
    hf = work / "dense_base_hf"
    subprocess.run([sys.executable, "-m", "mod_train.export", "--checkpoint", str(work / "dense_base" / "checkpoints"),
                    "--format", "hf", "--out", str(hf)], check=True, cwd=REPO, capture_output=True)
    init = f"checkpoint.init_from=hf:{hf}"
    runs = {
        "dense_continue": train("dense_continue", a.steps, "model=tiny", init),
        "mod_upcycled": train("mod_upcycled", a.steps, "model=tiny_mod", init,
                              f"model.mod.capacity_schedule.steps={a.schedule_steps}",
                              f"model.mod.capacity_schedule.phases={a.phases}"),
        "mod_scratch": train("mod_scratch", a.steps, "model=tiny_mod"),
    }
    curves = {name: losses(rows, "lm loss") for name, rows in runs.items()}
    final = {}
    for name, rows in runs.items():
        v = losses(rows, "valid lm loss (causal)") or losses(rows, "valid lm loss")
        final[name] = v[max(v)] if v else None
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    cmd = "python bench/upcycle.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Dense -> MoD upcycling (CPU, demo corpus, tiny presets)", "", f"Command: `{cmd}`", "",
             f"Dense base: model=tiny, {a.base_steps} steps from scratch, exported with `mod-export --format hf`. "
             f"Each run below: {a.steps} steps from the first sample, same seed/data/LR schedule. mod_upcycled: "
             f"`checkpoint.init_from=hf:<base>` with `model.mod.capacity_schedule.steps={a.schedule_steps} "
             f"phases={a.phases}` (capacity 1.0 -> 0.125).", "",
             "| step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{curves[n][s]:.3f}" for n in curves) + " |")
    lines += ["", "Validation loss at the end (causal routing for MoD): "
              + ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} n/a" for n, v in final.items()), ""]
    out = REPO / "bench" / "results" / "upcycle_cpu.md"
    out.write_text("\n".join(lines))
    result = {"final_valid": final, "curves": {n: {str(k): v for k, v in c.items()} for n, c in curves.items()}}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
