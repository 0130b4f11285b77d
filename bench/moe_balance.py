"""MoE load balance per ``model.moe.load_balancing``: how evenly the experts are loaded after N steps
of training, and what each choice costs per step.

    python bench/moe_balance.py --steps 200                     # tiny_moe on synthetic tokens
    python bench/moe_balance.py --steps 200 model.hidden_size=128 ...   # extra overrides go to every run

Each choice trains in its own process (``mod-train model=tiny_moe data=mock checkpoint.save=false``,
one rank, same seed and data). The imbalance of an MoE layer in a step is megatron's routing map
counted per expert: the busiest expert's tokens / the mean tokens per expert (``moe/layer{n}/load_max``,
1.0 = perfectly balanced), logged every step; the figure is its mean over the last --window
steps, per layer. Step time: the median of the logged iteration times after --warmup steps, and its
ratio to aux_loss's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import torch

from common import median, run_mod_train

CHOICES = {
    "aux_loss": [],
    "seq_aux_loss": ["model.moe.load_balancing=seq_aux_loss"],
    "expert_bias": ["model.moe.load_balancing=expert_bias"],
    "none": ["model.moe.load_balancing=none"],
}


def series(rows: List[dict], key: str) -> Dict[int, float]:
    out = {}
    for row in rows:
        if key in row and "step" in row:
            out[int(row["step"])] = float(row[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=50, help="imbalance: mean over the last N steps")
    ap.add_argument("--warmup", type=int, default=5, help="step time: median after N steps")
    ap.add_argument("--rate", type=float, default=1e-3, help="model.moe.bias_update_rate for expert_bias")
    ap.add_argument("--choices", nargs="*", default=list(CHOICES))
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once (the imbalance does not depend on it; step times do)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    base = ["model=tiny_moe", "data=mock", "model.vocab_size=512", "checkpoint.save=false", "tracking.enabled=false",
            f"train.max_steps={args.steps}", f"optim.warmup_steps={min(10, args.steps)}", "train.eval_interval=100000",
            f"model.moe.bias_update_rate={args.rate}", *args.overrides]
    print(f"device: cpu={platform.processor() or platform.machine()} threads={torch.get_num_threads()} "
          f"steps={args.steps} window={args.window} overrides={' '.join(base)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="moe_balance_") as tmp:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(lambda name: run_mod_train([*base, *CHOICES[name]], Path(tmp) / name), args.choices))
        for name, (code, last, rows) in zip(args.choices, runs):
            if code != 0:
                raise SystemExit(f"{name}: mod-train failed: {last}")
            layers = sorted({k for r in rows for k in r if k.startswith("moe/") and k.endswith("/load_max")})
            imbalance = {}
            for key in layers:
                values = series(rows, key)
                tail = [values[s] for s in sorted(values)[-args.window:]]
                imbalance[key.split("/")[1]] = (statistics.fmean(tail), max(tail))
            times = series(rows, "elapsed time per iteration (ms)")
            ms = median([times[s] for s in sorted(times) if s > args.warmup])
            results[name] = (imbalance, ms)
    ref_ms = results.get("aux_loss", next(iter(results.values())))[1]
    print(f"{'load_balancing':>14}  {'layer':>7}  {'max/mean (mean)':>15}  {'max/mean (worst)':>16}  "
          f"{'ms/step':>8}  {'x aux_loss':>10}")
    for name, (imbalance, ms) in results.items():
        for i, (layer, (mean, worst)) in enumerate(imbalance.items()):
            timing = f"{ms:8.1f}  {ms / ref_ms:10.3f}" if i == 0 else f"{'':8}  {'':10}"
            print(f"{name:>14}  {layer:>7}  {mean:15.3f}  {worst:16.3f}  {timing}")


if __name__ == "__main__":
    main()
