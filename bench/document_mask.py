"""Cost of document masking (data.reset_attention_mask): a dense and a MoD layer, forward + backward,
with SDPA's causal fast path (no mask) against a per-sample causal-and-same-document mask, side by side.

    OMP_NUM_THREADS=2 python bench/document_mask.py                  # CPU, fp32
    python bench/document_mask.py --hidden 2048 --seq 4096 --batch 4  # on a GPU: bf16

Documents are ``--doc-len`` tokens long (an EOD every doc-len tokens). Prints one row per layer and
a JSON line for bench/results/. Reported: the fastest forward + backward pass of each configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mod_layer import build, setup  # noqa: E402  (the same layers as the MoD layer bench)


def document_mask(seq: int, batch: int, doc_len: int, device) -> torch.Tensor:
    """megatron's mask [b, 1, s, s], True = masked out: causal and within documents of doc_len tokens."""
    doc = torch.arange(seq, device=device) // doc_len
    keep = (doc[:, None] == doc[None, :]) & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    return (~keep).expand(batch, 1, seq, seq).contiguous()


def time_layer(layer, device, dtype, args, mask) -> float:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=args.hidden // args.heads, rotary_percent=1.0)(args.seq).to(device)
    x = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype, requires_grad=True)

    def step():
        out, _ = layer(x, attention_mask=mask, rotary_pos_emb=rope)
        out.float().pow(2).mean().backward()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--doc-len", type=int, default=256)
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5,
                   help="every configuration once per round, in turn; the fastest pass over all rounds is "
                        "reported (on a shared machine the least disturbed one)")
    args = p.parse_args()
    setup()
    layers = {"dense": build(args, None), f"MoD cap {args.capacity}": build(args, args.capacity)}
    _, _, device, dtype = layers["dense"]
    masks = {"causal (no mask)": None, f"document mask (docs of {args.doc_len})":
             document_mask(args.seq, args.batch, args.doc_len, device)}
    times = {(layer, m): [] for layer in layers for m in masks}
    for _ in range(args.rounds):
        for (name, m) in times:
            layer = layers[name][0]
            times[(name, m)].append(time_layer(layer, device, dtype, args, masks[m]))
    fastest = {key: min(t) for key, t in times.items()}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name}  dtype: {dtype}  hidden={args.hidden} heads={args.heads} seq={args.seq} "
          f"batch={args.batch} doc_len={args.doc_len}  threads={torch.get_num_threads()}  rounds={args.rounds}")
    print(f"{'layer':>16} {'attention':>28} {'ms (fwd+bwd)':>14} {'x no mask':>10}")
    rows = {}
    for (name, m), t in fastest.items():
        base = fastest[(name, "causal (no mask)")]
        print(f"{name:>16} {m:>28} {t * 1e3:14.2f} {t / base:10.3f}")
        rows[f"{name.split()[0].lower()}_{'mask' if masks[m] is not None else 'causal'}_ms"] = t * 1e3
    print("RESULT " + json.dumps({"device": device_name, "args": vars(args), **rows}))


if __name__ == "__main__":
    main()
