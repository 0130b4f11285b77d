"""isoFLOP miniature of the MoD paper's main result (Raposo et al. 2024, fig. 3-4): at one fixed
training FLOP budget, train a dense baseline and MoD variants on the same data and compare their
final validation loss.

    python bench/isoflop.py --budget 1e17 --dense gpt_125m data.tokenizer_model=... 'data.paths=[...]'
    python bench/isoflop.py --budget 1e12 --dense tiny \\
        data.tokenizer_model=data/demo/tokenizer.model 'data.paths=[data/demo/corpus_text_document]'

Models (each trained from scratch for floor(budget / (train FLOPs per token x tokens per step)) steps,
FLOPs counted by mod_train/model/flops.py, Megatron-LM's count and the one the trainer logs):
  dense           the --dense preset
  mod             its MoD twin: every other layer routes --capacity of the sequence (the same
                  width and depth: fewer FLOPs per token, so more steps within the budget)
  mod_matched     the MoD twin made deeper (2 layers at a time, alternation kept) until its FLOPs
                  per token are closest to the dense model's: the paper's "MoD may be larger"
  moe             plain MoE: every other MLP is --mode-experts experts, top-2, half-width each (as
                  many active MLP FLOPs as dense), so a MoDE gain can be told from an MoE gain
  mode_staged, mode_integrated   the MoDE twins of that MoE (staged: MoD around the MoE layers;
                  integrated: top_k no-op columns in the router)
Integrated MoDE's FLOPs per token depend on the no-op share it learns, known only after training:
its steps are planned at the share its load-balancing loss aims for (n / (E + n) of the slots) and
the FLOPs it actually spent (the trainer's "total FLOPs", at the measured share) are reported next
to the budget. The learning-rate schedule (warmup, cosine decay) spans each run's own steps. One
validation at the end over --eval-iters batches. Models are ranked on "valid lm loss (causal)" when
the trainer logs it (MoD models routed by their causal decision: the model that samples), else on
"valid lm loss" (dense and MoE models are causal anyway). With several --seeds each model is
trained once per seed (train.seed) and ranked on the mean. A table and a RESULT json line are printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import model_config, run_mod_train

CAUSAL_LOSS = "valid lm loss (causal)"  # MoD routed by its causal decision (logged by evaluate())
LOSS = "valid lm loss"


def train_flops_per_token(cfg, derived) -> float:
    """The planned count: flops.py's, integrated MoDE at its load-balanced no-op share."""
    from mod_train.model.flops import balanced_noop_fraction, train_flops_per_token as count

    return count(cfg.model, derived.ffn_hidden_size, derived.padded_vocab_size, derived.mod_layers,
                 derived.mod_capacities, derived.moe_layers, noop_fraction=balanced_noop_fraction(cfg.model))


def variants(args) -> Dict[str, List[str]]:
    """Name -> model overrides of every variant to train."""
    mod = ["model.mod.enabled=true", "model.mod.every=2", "model.mod.offset=1",
           f"model.mod.capacity={args.capacity}", "model.mod.layers=null"]
    cfg, d = model_config(args.dense, args.overrides)
    half = d.ffn_hidden_size // 2
    moe = [f"model.moe.num_experts={args.mode_experts}", "model.moe.top_k=2", "model.moe.every=2",
           "model.moe.offset=1", f"model.moe.ffn_hidden_size={half}", "model.moe.layers=null"]
    out = {"dense": [], "mod": mod}
    out["mod_matched"] = mod + [f"model.num_layers={matched_depth(args, mod, cfg.model.num_layers)}"]
    out["moe"] = moe
    if not args.no_mode:
        out["mode_staged"] = mod + moe + ["model.moe.mode=staged"]
        out["mode_integrated"] = moe + ["model.moe.mode=integrated"]
    return out


def matched_depth(args, mod_overrides: List[str], dense_layers: int) -> int:
    """The MoD depth (dense_layers + 2j) whose FLOPs per token are closest to the dense model's."""
    target = train_flops_per_token(*model_config(args.dense, args.overrides))
    best, best_gap = dense_layers, None
    for layers in range(dense_layers, 4 * dense_layers + 1, 2):
        flops = train_flops_per_token(*model_config(args.dense, [*args.overrides, *mod_overrides,
                                                                 f"model.num_layers={layers}"]))
        gap = abs(flops - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = layers, gap
        if flops > target:
            break
    return best


def train_within_budget(name: str, model_overrides: List[str], args, workdir: Path, seed: int) -> dict:
    overrides = [*args.overrides, *model_overrides, f"train.seed={seed}"]
    cfg, d = model_config(args.dense, overrides)
    flops_per_token = train_flops_per_token(cfg, d)
    tokens_per_step = d.global_batch_size * cfg.model.seq_length
    steps = int(args.budget // (flops_per_token * tokens_per_step))
    if steps < 10:
        raise SystemExit(f"{name}: the budget {args.budget:.3g} buys only {steps} steps at "
                         f"{flops_per_token * tokens_per_step:.3g} FLOPs per step: raise --budget")
    run = [f"model={args.dense}", *overrides, f"train.max_steps={steps}", f"train.eval_interval={steps}",
           f"train.eval_iters={args.eval_iters}", f"train.log_interval={max(steps // 20, 1)}",
           f"optim.warmup_steps={max(steps // 50, 1)}", "checkpoint.save=false", "tracking.enabled=false"]
    t0 = time.time()
    code, last_error, rows = run_mod_train(run, workdir / f"{name}_seed{seed}", args.nproc)
    if code != 0:
        return {"name": name, "seed": seed, "error": f"exit {code}: {last_error}"}
    valid = [r for r in rows if LOSS in r]
    timed = [r["elapsed time per iteration (ms)"] for r in rows if "elapsed time per iteration (ms)" in r]
    spent = next((r["total FLOPs"] for r in reversed(rows) if "total FLOPs" in r), None)
    return {"name": name, "seed": seed, "layers": cfg.model.num_layers,
            "forward_flops_per_token": flops_per_token / 3,
            "forward_flops_per_sequence": flops_per_token / 3 * cfg.model.seq_length,
            "steps": steps, "tokens": steps * tokens_per_step, "flops": steps * tokens_per_step * flops_per_token,
            "spent_flops": spent,  # the trainer's count (integrated MoDE at its measured no-op share)
            "valid_loss": valid[-1][LOSS] if valid else None,
            "valid_loss_causal": valid[-1].get(CAUSAL_LOSS) if valid else None,
            "train_loss": next((r["lm loss"] for r in reversed(rows) if "lm loss" in r), None),
            "ms_per_step": sorted(timed)[len(timed) // 2] if timed else None, "wall_s": time.time() - t0}


def ranking_loss(row: dict) -> Optional[float]:
    """The causal validation loss when the trainer logged it, else the (top-k) validation loss."""
    return row["valid_loss_causal"] if row.get("valid_loss_causal") is not None else row.get("valid_loss")


def summarize(rows: List[dict]) -> List[dict]:
    """Per model: the mean (and min..max over seeds) of the ranking loss, best first."""
    by_name: Dict[str, List[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    out = []
    for name, runs in by_name.items():
        ok = [r for r in runs if "error" not in r and ranking_loss(r) is not None]
        losses = [ranking_loss(r) for r in ok]
        out.append({"name": name, "runs": len(runs), "ok": len(ok),
                    "metric": CAUSAL_LOSS if ok and ok[0].get("valid_loss_causal") is not None else LOSS,
                    "mean": sum(losses) / len(losses) if losses else None,
                    "min": min(losses) if losses else None, "max": max(losses) if losses else None,
                    "topk_mean": (sum(r["valid_loss"] for r in ok) / len(ok)) if ok else None})
    return sorted(out, key=lambda s: (s["mean"] is None, s["mean"] or 0.0))


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, required=True, help="training FLOPs per model (e.g. 1e17)")
    p.add_argument("--dense", default="tiny", help="the dense baseline's conf/model preset")
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--mode-experts", type=int, default=4)
    p.add_argument("--no-mode", action="store_true", help="skip the MoDE variants")
    p.add_argument("--only", default=None, help="train only these variants, comma-separated (e.g. dense,mod)")
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--seeds", default="1234", help="comma-separated train.seed values (each model once per seed)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (data, parallel, optim, ...)")
    args = p.parse_args(argv)

    todo = variants(args)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(todo))
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; choose from {sorted(todo)}")
        todo = {k: v for k, v in todo.items() if k in wanted}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mod-isoflop-") as tmp:
        for seed in seeds:
            for name, model_overrides in todo.items():
                rows.append(train_within_budget(name, model_overrides, args, Path(tmp), seed))
                print(json.dumps(rows[-1]), flush=True)

    def fmt(x, spec):
        return format(x, spec) if x is not None else "-"

    print(f"\nisoFLOP budget {args.budget:.3g} training FLOPs per model, dense baseline {args.dense}, seeds {seeds}")
    print(f"{'model':>16} {'seed':>5} {'layers':>6} {'fwd FLOPs/seq':>14} {'steps':>7} {'tokens':>11} "
          f"{'spent/budget':>12} {'valid loss':>10} {'causal':>8} {'ms/step':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:>16} {r['seed']:>5} failed: {r['error']}")
            continue
        spent = r["spent_flops"] / args.budget if r["spent_flops"] is not None else None
        print(f"{r['name']:>16} {r['seed']:>5} {r['layers']:>6} {r['forward_flops_per_sequence']:14.4g} {r['steps']:>7} "
              f"{r['tokens']:>11} {fmt(spent, '12.3f')} {fmt(r['valid_loss'], '10.4f')} "
              f"{fmt(r['valid_loss_causal'], '8.4f')} {fmt(r['ms_per_step'], '8.1f')}")
    ranking = summarize(rows)
    print(f"\nranked on the mean over seeds of {ranking[0]['metric'] if ranking else LOSS}:")
    for i, s in enumerate(ranking, 1):
        print(f"{i:>3}. {s['name']:>16} {fmt(s['mean'], '.4f')} (min {fmt(s['min'], '.4f')}, max {fmt(s['max'], '.4f')}; "
              f"top-k valid loss {fmt(s['topk_mean'], '.4f')}; {s['ok']}/{s['runs']} runs)")
    summary = {"budget": args.budget, "dense": args.dense, "overrides": args.overrides, "seeds": seeds,
               "rows": rows, "ranking": ranking}
    print("RESULT " + json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
