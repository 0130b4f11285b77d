"""Sampling speed of the generation path (KV cache, causal MoD routing): a dense model against its
MoD twin, side by side in one run.

    python bench/sampling.py --models tiny tiny_mod                    # random init (CPU smoke run)
    python bench/sampling.py --checkpoints runs/dense/checkpoints runs/mod/checkpoints   # trained

Each model decodes --prompt-len prompt tokens then --new-tokens greedy tokens with
``mod_train.inference.generation.generate_batch`` (the code behind ``mod-generate``), --repeats times; the median is
reported as tokens/s (prompt + new tokens, all decoded one at a time through the cache), with
the share of tokens each MoD layer's causal decision routed through its block. That share decides
MoD's speed-up: a trained router routes about its capacity (12.5%); a random one about half the
tokens, so random-init figures say little about MoD's gain. Target (issue 7): MoD >= 1.4x dense.

--batch 1 32 (the default) measures both batch sizes: a batch decodes its prompts together
(``generate_batch``), each sequence routed by its own decisions.

--heldout PREFIX measures, for the MoD model, the share of tokens each MoD layer's causal decision
routes on real text (the last --heldout-seqs sequences of seq_length tokens of an indexed dataset,
one causal forward): the share sampling runs at on text like the training data, to set against the
capacity. Greedy continuations of random prompts (the timed part) are not such text.

--uncalibrated also runs the MoD model with every causal threshold set to 0 (the decision
``logit > 0`` that mod-generate used before thresholds were calibrated in training), so the routed
share and the speed before and after calibration stand side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_model(preset: str, vocab: int):
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.model.build import build_model_chunks

    cfg = to_config(compose([f"model={preset}", "data=mock", f"model.vocab_size={vocab}"]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=torch.cuda.is_available())
    torch.manual_seed(0)
    return build_model_chunks(cfg, d)[0].eval(), cfg


def time_generation(model, cfg, args, batch: int) -> dict:
    from mod_train.inference.generation import generate_batch

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.model.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
    generate_batch(model, cfg, [p[:4] for p in prompts], 4, greedy=True)  # warm-up: rope tables, kernels
    times = []
    for _ in range(args.repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = generate_batch(model, cfg, prompts, args.new_tokens, greedy=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    # Per MoD layer: routed share over all sequences' tokens (of the last repeat).
    routed = result.routed_share()
    tokens = batch * args.prompt_len + sum(map(len, result.tokens))
    return {"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mod_routed_share": routed}


def heldout_routed_share(model, cfg, prefix: str, sequences: int) -> List[float]:
    """Per MoD layer: share of real-text tokens its causal decision routes (full causal forward)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mod_train.model.mod import causal_routing

    seq = cfg.model.seq_length
    data = IndexedDataset(prefix)
    tokens: List[np.ndarray] = []
    need = sequences * seq
    for i in range(len(data) - 1, -1, -1):  # from the end: the documents least likely trained on
        tokens.insert(0, data[i])
        need -= len(data[i])
        if need <= 0:
            break
    flat = np.concatenate(tokens)[-sequences * seq:].astype(np.int64)
    batch = torch.from_numpy(flat).view(-1, seq)
    positions = torch.arange(seq).unsqueeze(0).expand_as(batch)
    model.eval()
    with torch.no_grad(), causal_routing([model]) as layers:
        shares: List[List[float]] = [[] for _ in layers]
        def record(i, layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            decision = layer.router.causal_decision(layer.router.causal_logits(x, layer.router.scores(x)))
            shares[i].append(float(decision.float().mean()))

        hooks = [layer.register_forward_pre_hook(lambda mod, args, kwargs, i=i: record(i, mod, args, kwargs),
                                                 with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            model(batch, positions, None)
        finally:
            for h in hooks:
                h.remove()
    return [sum(s) / len(s) for s in shares]


@contextlib.contextmanager
def uncalibrated(model):
    """Every MoD layer's causal threshold at 0 within the block (restored after)."""
    from mod_train.model.mod import mod_layers_of

    routers = [layer.router for layer in mod_layers_of([model])]
    saved = [r.causal_threshold.clone() for r in routers]
    for r in routers:
        r.causal_threshold.zero_()
    try:
        yield
    finally:
        for r, t in zip(routers, saved):
            r.causal_threshold.copy_(t)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs=2, default=["tiny", "tiny_mod"], metavar=("DENSE", "MOD"),
                   help="conf/model presets, random init")
    p.add_argument("--checkpoints", nargs=2, default=None, metavar=("DENSE", "MOD"),
                   help="trained checkpoints instead (checkpoint roots or iter_* dirs)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of random-init models")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes to measure")
    p.add_argument("--heldout", default=None, metavar="PREFIX",
                   help="indexed dataset prefix: MoD causal routed share on its last sequences")
    p.add_argument("--heldout-seqs", type=int, default=16)
    p.add_argument("--uncalibrated", action="store_true",
                   help="also time the MoD model with its causal thresholds at 0 (before calibration)")
    args = p.parse_args(argv)

    from mod_train.distributed.world_of_one import world_of_one
    from mod_train.inference.loader import load_for_generation

    from mod_train.model.mod import mod_layers_of

    rows, heldout, capacities = {}, {}, []
    with world_of_one():
        for i, kind in enumerate(("dense", "mod")):
            if args.checkpoints:
                loaded = load_for_generation(args.checkpoints[i])
                model, cfg = loaded.model, loaded.config
                name = f"{kind} ({loaded.source.iter_dir})"
            else:
                model, cfg = random_model(args.models[i], args.vocab)
                name = f"{kind} ({args.models[i]}, random init)"
            for batch in args.batch:
                rows[f"{kind} b{batch}"] = {"name": name, **time_generation(model, cfg, args, batch)}
            if kind == "mod" and args.heldout:
                heldout["calibrated thresholds"] = heldout_routed_share(model, cfg, args.heldout, args.heldout_seqs)
                if args.uncalibrated:
                    with uncalibrated(model):
                        heldout["thresholds at 0"] = heldout_routed_share(model, cfg, args.heldout,
                                                                          args.heldout_seqs)
                capacities = [layer.capacity for layer in mod_layers_of([model])]
            if kind == "mod" and args.uncalibrated:
                with uncalibrated(model):
                    for batch in args.batch:
                        rows[f"mod-t0 b{batch}"] = {"name": name + " threshold 0",
                                                    **time_generation(model, cfg, args, batch)}
            del model
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}  prompt {args.prompt_len} + {args.new_tokens} new tokens per sequence, greedy, "
          f"median of {args.repeats}")
    for label, shares in heldout.items():
        print(f"held-out text, MoD causal routed share per layer ({label}): "
              + ", ".join(f"{s:.1%}" for s in shares) + " (capacity " + ", ".join(f"{c:.1%}" for c in capacities) + ")")
    for row in rows.values():
        share = ", ".join(f"{s:.0%}" for s in row["mod_routed_share"]) or "-"
        print(f"{row['name']:>56} batch {row['batch']:>3} {row['tokens_per_s']:10.1f} tokens/s   "
              f"MoD layers routed: {share}")
    speedup = {b: rows[f"mod b{b}"]["tokens_per_s"] / rows[f"dense b{b}"]["tokens_per_s"] for b in args.batch}
    for b, x in speedup.items():
        print(f"batch {b}: MoD / dense sampling speed: {x:.3f}x  (target >= 1.4x with a trained router)")
    if args.uncalibrated:
        for b in args.batch:
            print(f"batch {b}: MoD with thresholds at 0 / dense: "
                  f"{rows[f'mod-t0 b{b}']['tokens_per_s'] / rows[f'dense b{b}']['tokens_per_s']:.3f}x")
    summary = {"device": device, "args": vars(args), "rows": rows,
               "mod_over_dense": {str(b): x for b, x in speedup.items()},
               "heldout_causal_routed_share": heldout, "mod_capacities": capacities}
    print("RESULT " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
