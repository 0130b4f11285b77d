"""Time of a MoD layer at capacity 1.0 / 0.5 / 0.25 / 0.125 relative to the dense layer of the same
size (forward + backward), side by side in one run.

    python bench/mod_layer.py                      # CPU, fp32, small sizes
    python bench/mod_layer.py --hidden 2048 --seq 4096 --batch 4   # on a GPU: bf16, sizes that fill it

Targets (issue 4): capacity 1.0 <= 1.05x dense; capacity 0.125 <= 0.2x dense on GPU.
Prints one row per configuration and a JSON line for bench/results/.
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


def setup(tp: int = 1):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from mod_train.compat import apply_cpu_patches

        apply_cpu_patches()
    # One process: an in-memory store, no rendezvous port.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    ps.initialize_model_parallel(tp, 1, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(0)


def build(args, capacity):
    from mod_train.config.load import compose, to_config
    from mod_train.config.schema import ModConfig
    from mod_train.config.validate import validate
    from mod_train.model.build import transformer_config
    from mod_train.model.mod import MoDTransformerLayer
    from mod_train.model.specs import base_layer_spec

    cfg = to_config(compose([f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
                             f"model.seq_length={args.seq}", "model.vocab_size=128",
                             f"train.precision={'bf16' if torch.cuda.is_available() else 'fp32'}"]))
    d = validate(cfg, world_size=1, check_files=False)
    tcfg = transformer_config(cfg, d)
    spec = base_layer_spec(cfg.model, moe=False)
    if capacity is None:
        layer = spec.module(config=tcfg, submodules=spec.submodules, layer_number=1)
    else:
        layer = MoDTransformerLayer(config=tcfg, submodules=spec.submodules, layer_number=1, capacity=capacity,
                                    mod=ModConfig(enabled=True), seq_length=args.seq)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return layer.to(device=device, dtype=dtype), cfg, device, dtype


def time_layer(layer, cfg, device, dtype, args) -> float:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=args.hidden // args.heads, rotary_percent=1.0)(args.seq).to(device)
    x = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype, requires_grad=True)

    def step():
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
        out.float().pow(2).mean().backward()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5,
                   help="time every layer once per round, in turn, so drift in the machine's speed "
                        "(other jobs, clocks) hits all layers alike; report the median over rounds")
    args = p.parse_args()
    setup()
    capacities = (1.0, 0.5, 0.25, 0.125)
    layers = {"dense": build(args, None)}
    for cap in capacities:
        layers[f"MoD cap {cap}"] = build(args, cap)
    times: dict = {name: [] for name in layers}
    for _ in range(args.rounds):
        for name, (layer, cfg, device, dtype) in layers.items():
            times[name].append(time_layer(layer, cfg, device, dtype, args))
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    _, cfg, device, dtype = layers["dense"]
    dense = median["dense"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name}  dtype: {dtype}  hidden={args.hidden} heads={args.heads} seq={args.seq} "
          f"batch={args.batch}  threads={torch.get_num_threads()}  rounds={args.rounds}")
    print(f"{'layer':>16} {'ms (fwd+bwd)':>14} {'x dense':>8}")
    rows = {"dense_ms": dense * 1e3}
    for name, t in median.items():
        print(f"{name:>16} {t * 1e3:14.2f} {t / dense:8.3f}")
        if name != "dense":
            rows[f"mod_{name.split()[-1]}_ratio"] = t / dense
    print("RESULT " + json.dumps({"device": device_name, "args": vars(args), **rows}))


if __name__ == "__main__":
    main()
