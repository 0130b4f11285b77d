"""Training throughput of mod-train's own step (megatron-core model, DeepSpeed engine, our schedule)
for several model presets side by side: ms/step, tokens/s, TFLOP/s per device, MFU against the
matmul peak measured in the same run, peak memory, and the ratios the issues set targets for.

    python bench/throughput.py                    # GPU: gpt_125m/350m/1b + the 350m MoD/MoE/MoDE twins
    python bench/throughput.py --scale tiny       # CPU: the tiny presets (a smoke run of the same path)

Each model trains in its own process (``mod-train data=mock checkpoint.save=false``: synthetic
tokens, no checkpoints, no MLflow) for --warmup + --steps steps; the figures are medians over the
steps after warm-up, read back from the run's metrics.jsonl. FLOPs per token come from
mod_train/model/flops.py (MoD layers count their routed tokens only), so MoD's TFLOP/s is model
FLOPs actually done, and "x dense" compares step times. A plain-PyTorch GPT of the same shape as
each dense preset (bench/reference_gpt.py: SDPA, torch.compile on GPU) runs in the same invocation
unless --no-reference.

Targets (issue 7): dense MFU >= 45% at 1B on one H200; MoD step time <= 0.62x its dense twin; our
dense step no slower than the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from common import REPO, last_line, median, model_config, run_mod_train, train_flops_per_token

SCALES = {
    # scale: (models, the dense twin each ratio is taken against, dense presets with a reference)
    "gpu": (["gpt_125m", "gpt_350m", "gpt_1b", "gpt_350m_mod", "gpt_350m_moe", "gpt_350m_mode_staged",
             "gpt_350m_mode_integrated"], "gpt_350m", ["gpt_125m", "gpt_350m", "gpt_1b"]),
    "tiny": (["tiny", "tiny_mod", "tiny_moe", "tiny_mode_staged", "tiny_mode_integrated"], "tiny", ["tiny"]),
}


def measured_matmul_tflops(cuda: bool) -> float:
    """Peak dense matmul throughput of this device, measured: bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if cuda else 3
    for _ in range(2):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def run_ours(model: str, seq_length: int, args, workdir: Path) -> Dict[str, float]:
    run_dir = workdir / model
    overrides = [
        f"model={model}", "data=mock", f"model.vocab_size={args.vocab}",
        f"train.max_steps={args.warmup + args.steps}", "train.log_interval=1", "train.eval_interval=1000000",
        "checkpoint.save=false", "tracking.enabled=false", f"parallel.micro_batch_size={args.micro_batch}",
        f"parallel.global_batch_size={args.micro_batch * args.grad_accum * args.nproc}", *args.overrides]
    t0 = time.time()
    code, last_error, rows = run_mod_train(overrides, run_dir, args.nproc)
    if code != 0:
        return {"error": f"exit {code}: {last_error}"}
    timed = [row for row in rows if "elapsed time per iteration (ms)" in row and row["step"] > args.warmup]
    if not timed:
        return {"error": f"no timed steps in {run_dir / 'metrics.jsonl'}"}
    ms = median([row["elapsed time per iteration (ms)"] for row in timed])
    # Tokens/s and TFLOP/s from the median step time, so the three columns agree. FLOPs per token
    # as the trainer counted them (integrated MoDE: at the no-op share it measured).
    tokens_per_step = timed[0]["global batch size"] * seq_length
    out = {"elapsed time per iteration (ms)": ms, "tokens/s": tokens_per_step / (ms / 1e3)}
    out["TFLOP/s/device"] = median([row["TFLOP/s/device"] / row["tokens/s"] for row in timed]) * out["tokens/s"]
    if "memory (GB)" in timed[-1]:
        out["memory (GB)"] = max(row["memory (GB)"] for row in timed)
    out["wall s"] = time.time() - t0
    out["loss first/last"] = f"{rows[0]['lm loss']:.3f}/{rows[-1]['lm loss']:.3f}"
    return out


def run_reference(model: str, args) -> Dict[str, float]:
    cmd = [sys.executable, str(REPO / "bench" / "reference_gpt.py"), "--model", model, "--vocab", str(args.vocab),
           "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--steps", str(args.steps),
           "--warmup", str(args.warmup), *(["--no-compile"] if args.no_compile else []), *args.overrides]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not result:
        return {"error": f"exit {r.returncode}: {last_line(r.stderr)}"}
    return json.loads(result[-1][len("RESULT "):])


def seq_and_flops_per_token(model: str, args) -> tuple:
    """(sequence length, training FLOPs per token) of a preset with the run's overrides."""
    cfg, d = model_config(model, ["data=mock", f"model.vocab_size={args.vocab}", *args.overrides], args.nproc)
    return cfg.model.seq_length, train_flops_per_token(cfg, d)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu" if torch.cuda.is_available() else "tiny")
    p.add_argument("--models", nargs="+", default=None, help="presets to run (default: the scale's list)")
    p.add_argument("--dense", default=None, help="the dense twin for 'x dense' (default: the scale's)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=None, help="default: 4 on GPU, 8 on CPU")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run; data parallel")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="reference without torch.compile")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. parallel.zero_stage=1")
    args = p.parse_args(argv)
    models, dense, with_reference = SCALES[args.scale]
    models = args.models or models
    dense = args.dense or dense
    cuda = torch.cuda.is_available()
    args.micro_batch = args.micro_batch or (4 if cuda else 8)

    peak = measured_matmul_tflops(cuda)
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mod-throughput-") as tmp:
        for model in models:
            seq_length, flops = seq_and_flops_per_token(model, args)
            results[model] = run_ours(model, seq_length, args, Path(tmp))
            results[model]["flops/token"] = flops
            if not args.no_reference and model in with_reference:
                results[f"{model} (reference)"] = ref = run_reference(model, args)
                if "ms_per_step" in ref:
                    ref["TFLOP/s/device"] = flops * ref["tokens_per_s"] / 1e12

    print(f"device: {device_name}  measured matmul peak: {peak:.1f} TFLOP/s ({'bf16' if cuda else 'fp32'})  "
          f"micro-batch {args.micro_batch} x accum {args.grad_accum} x procs {args.nproc}  vocab {args.vocab}  "
          f"threads {torch.get_num_threads()}")
    header = f"{'model':>34} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7} {'x dense':>8}"
    print(header)
    dense_ms = results.get(dense, {}).get("elapsed time per iteration (ms)")
    summary = {"device": device_name, "peak_tflops_measured": peak, "args": {k: v for k, v in vars(args).items()}}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:>34} failed: {r['error']}")
            continue
        ms = r.get("elapsed time per iteration (ms)", r.get("ms_per_step"))
        tps = r.get("tokens/s", r.get("tokens_per_s"))
        tflops = r["TFLOP/s/device"]
        mem = r.get("memory (GB)", r.get("memory_gb"))
        ratio = ms / dense_ms if dense_ms and not name.endswith("(reference)") else None
        r.update({"ms": ms, "mfu": tflops / peak, "x_dense": ratio})
        print(f"{name:>34} {ms:9.1f} {tps:10.0f} {tflops:8.2f} {tflops / peak:6.1%} "
              f"{'' if mem is None else f'{mem:.1f}':>7} {'' if ratio is None else f'{ratio:.3f}':>8}")
    for model in with_reference:
        ours, ref = results.get(model, {}), results.get(f"{model} (reference)", {})
        if "ms" in ours and "ms" in ref:
            summary[f"{model}_ours_vs_reference"] = ours["ms"] / ref["ms"]
            print(f"{model}: our step / reference step = {ours['ms'] / ref['ms']:.3f}  (target <= 1.0)")
    summary["results"] = results
    print("RESULT " + json.dumps(summary, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
