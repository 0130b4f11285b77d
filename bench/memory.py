"""Peak memory of one training step per activation-recomputation setting (model.recompute) and per
ZeRO stage, at a size where activations dominate (long sequence, several layers, small hidden).

    python bench/memory.py                                   # CPU: the full table (about 5 minutes)
    python bench/memory.py --settings none,full --zero 1     # a subset
    python bench/memory.py --scale gpu                       # GPU: gpt_125m at seq 4096 (one process)

Every measurement is mod-train's own training run (``trainer.build_run``: megatron-core model,
DeepSpeed engine, megatron's schedule, synthetic tokens from ``data=mock``) for two steps, with a
callback that reads the memory before step 1 and the peak after step 2:

* GPU: ``torch.cuda.max_memory_allocated()`` since ``reset_peak_memory_stats()`` before step 1,
  and ``memory_allocated()`` then. Exact, so one process runs every setting in turn.
* CPU: torch has no allocator statistics for host memory, and tracemalloc does not see torch's
  allocations. The process's resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``)
  after step 2 and its resident set (``/proc/self/statm``) before step 1, in a fresh process per
  setting (the high-water mark never goes down). A step whose peak stays below what set-up already
  reached is flagged ``setup-bound`` (its figure is then an upper bound).

``step MB`` = peak - before: activations, gradients, the optimizer states Adam creates at step 1,
temporaries. ``x none`` = step MB / step MB of the run without recomputation at the same ZeRO stage
and data-parallel size. ZeRO partitions optimizer states (1), gradients (2) and parameters (3) over
data-parallel ranks, so it is measured at ``--nproc`` ranks (default 2: DP2; on one GPU: DP1, where
ZeRO partitions nothing), per rank, the largest rank reported. ``s/step`` is the second step's wall
time (the price of recomputation; unreliable on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

# name: model.recompute overrides
SETTINGS: Dict[str, List[str]] = {
    "none": [],
    "selective-core_attn": ["model.recompute.granularity=selective", "model.recompute.modules=[core_attn]"],
    "selective-mlp": ["model.recompute.granularity=selective", "model.recompute.modules=[mlp]"],
    "selective-core_attn+mlp": ["model.recompute.granularity=selective", "model.recompute.modules=[core_attn,mlp]"],
    "full-block-half": ["model.recompute.granularity=full", "model.recompute.method=block"],  # num_layers: half
    "full": ["model.recompute.granularity=full"],  # uniform, every layer
}

SCALES = {
    # model overrides, default settings, default ZeRO stages (with recompute none and full)
    "cpu": (["model=tiny", "model.num_layers=8", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.seq_length=2048", "model.vocab_size=512", "parallel.micro_batch_size=2"],
            list(SETTINGS), [0, 1, 2, 3]),
    # One GPU: ZeRO at DP1 partitions nothing, so no ZeRO sweep by default.
    "gpu": (["model=gpt_125m", "model.seq_length=4096", "model.vocab_size=32000", "parallel.micro_batch_size=4"],
            ["none", "selective-mlp", "full"], []),
}


def setting_overrides(name: str, num_layers: int) -> List[str]:
    extra = list(SETTINGS[name])
    if name == "full-block-half":
        extra.append(f"model.recompute.num_layers={max(num_layers // 2, 1)}")
    return extra


# ------------------------------------------------------------------------------------------- child
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure(overrides: List[str]) -> dict:
    """Two training steps of ``overrides``; memory before step 1 and the peak up to the end of step 2."""
    import torch

    from mod_train.callbacks.base import Callback
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.trainer import build_run

    cuda = torch.cuda.is_available()

    class PeakProbe(Callback):
        def __init__(self):
            self.out: dict = {}
            self.t = 0.0

        def on_step_begin(self, state) -> None:
            if state.step == 0:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    self.out["before"] = torch.cuda.memory_allocated()
                else:
                    self.out["before"], self.out["setup_hwm"] = _rss_bytes(), _hwm_bytes()
            self.t = time.perf_counter()

        def on_step(self, state, step) -> None:
            if cuda:
                torch.cuda.synchronize()
            if state.step == 2:
                self.out["s_per_step"] = time.perf_counter() - self.t
                self.out["peak"] = torch.cuda.max_memory_allocated() if cuda else _hwm_bytes()

    cfg = to_config(compose(overrides))
    run = build_run(cfg, validate(cfg))
    probe = PeakProbe()
    run.trainer.callbacks.callbacks.append(probe)
    try:
        run.trainer.fit()
    finally:
        run.close(keep_process_group=True)
    out = probe.out
    out["step"] = out["peak"] - out["before"]
    out["setup_bound"] = (not cuda) and out["peak"] <= out["setup_hwm"]
    return out


def child(args) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    results = {}
    for name in args.settings.split(","):
        overrides = [*args.model_overrides, *setting_overrides(name, args.num_layers),
                     f"parallel.zero_stage={args.zero_one}", "data=mock", "train.max_steps=2", "train.log_interval=1",
                     "train.eval_interval=1000000", "checkpoint.save=false", "tracking.enabled=false",
                     f"train.run_dir={args.run_dir}/{name.replace('+', '_')}_z{args.zero_one}"]
        results[name] = measure(overrides)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(args.child_out).with_suffix(f".rank{rank}.json").write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------ parent
def launch(settings: List[str], zero: int, args, model_overrides: List[str], tmp: Path) -> Dict[str, dict]:
    """One child process (torchrun with --nproc > 1) for ``settings``; the largest rank's figures."""
    out = tmp / f"res_{zero}_{abs(hash(tuple(settings)))}"
    cmd = [str(REPO / "bench" / "memory.py"), "--child", "--settings", ",".join(settings), "--zero-one", str(zero),
           "--num-layers", str(args.num_layers), "--child-out", str(out), "--run-dir", str(tmp / "runs"),
           "--", *model_overrides]
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    r = subprocess.run([*launcher, *cmd], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    files = sorted(tmp.glob(out.name + ".rank*.json"))
    if r.returncode != 0 or len(files) != args.nproc:
        lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()]
        return {s: {"error": f"exit {r.returncode}: {lines[-1] if lines else ''}"[-400:]} for s in settings}
    ranks = [json.loads(f.read_text()) for f in files]
    return {s: max((rk[s] for rk in ranks), key=lambda x: x["step"]) for s in settings}


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default=None, help="default: gpu on CUDA, else cpu")
    p.add_argument("--settings", default=None, help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    p.add_argument("--zero", default=None, help="ZeRO stages for the sweep (with recompute none and full), e.g. "
                                                "0,1,2,3; none: no sweep")
    p.add_argument("--nproc", type=int, default=None, help="ranks of the ZeRO sweep (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero-one", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--num-layers", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("model_overrides", nargs="*", help="Hydra overrides for every run (after the scale's)")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}

    import torch

    from mod_train.config.load import compose, to_config

    cuda = torch.cuda.is_available()
    scale = args.scale or ("gpu" if cuda else "cpu")
    base, default_settings, default_zero = SCALES[scale]
    model_overrides = [*base, *args.model_overrides]
    args.num_layers = to_config(compose(["data=mock", *model_overrides])).model.num_layers
    settings = args.settings.split(",") if args.settings else default_settings
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    zero_stages = default_zero if args.zero is None else [int(z) for z in args.zero.split(",") if z not in ("", "none")]
    sweep_nproc = args.nproc or (1 if cuda else 2)
    rows: List[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mod-memory-") as tmp:
        # Recompute settings: one process, ZeRO 1 (the default stage).
        args.nproc = 1
        groups = [settings] if cuda else [[s] for s in settings]
        for group in groups:
            for s, r in launch(group, 1, args, model_overrides, Path(tmp)).items():
                rows.append({"setting": s, "zero": 1, "dp": 1, **r})
        # ZeRO stages at sweep_nproc ranks, without recomputation and with full recomputation.
        args.nproc = sweep_nproc
        for z in zero_stages:
            pair = ["none", "full"]
            for group in ([pair] if cuda else [[s] for s in pair]):
                for s, r in launch(group, z, args, model_overrides, Path(tmp)).items():
                    rows.append({"setting": s, "zero": z, "dp": sweep_nproc, **r})
    mb = 1e6
    unit = "allocated (torch.cuda.max_memory_allocated)" if cuda else "resident set (ru_maxrss, fresh process each)"
    print(f"scale {scale}: {' '.join(model_overrides)}; peak {unit}; per rank, largest rank; {time.time() - t0:.0f} s")
    print(f"{'setting':>24} {'ZeRO':>4} {'DP':>3} {'before MB':>10} {'peak MB':>9} {'step MB':>9} {'x none':>7} "
          f"{'s/step':>7}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['setting']:>24} {r['zero']:>4} {r['dp']:>3}  failed: {r['error']}")
            continue
        ref = next((x for x in rows if x["setting"] == "none" and x["zero"] == r["zero"] and x["dp"] == r["dp"]
                    and "step" in x), None)
        r["x_none"] = r["step"] / ref["step"] if ref else None
        note = "setup-bound (upper bound)" if r.get("setup_bound") else ""
        print(f"{r['setting']:>24} {r['zero']:>4} {r['dp']:>3} {r['before'] / mb:10.1f} {r['peak'] / mb:9.1f} "
              f"{r['step'] / mb:9.1f} {'' if r['x_none'] is None else format(r['x_none'], '.3f'):>7} "
              f"{r['s_per_step']:7.2f}  {note}")
    summary = {"scale": scale, "device": "cuda" if cuda else "cpu", "overrides": model_overrides, "rows": rows}
    print("RESULT " + json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
