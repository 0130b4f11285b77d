"""Cost of self-verifying checkpoints on a ~100 MB checkpoint: the manifest rank 0 computes over
the staged directory before the commit (xxh3-128 and the blake2b fallback), the verification on
resume, and the non-finite weight check before a save (torch.isfinite over 25 M fp32 weights).

    .venv/bin/python bench/checkpoint_checksum.py [--mb 100] [--repeats 3]

Files are read back from the page cache right after the write, as at a real commit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from mod_train.checkpoint import integrity


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A checkpoint's shape: model states (1/4), optimizer partition (1/2), layout-free copy (1/4).
        for rel, share in (("state/model_states.pt", 0.25), ("state/optim_states.pt", 0.5),
                           ("model/__0_0.distcp", 0.25)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(os.urandom(int(args.mb * share * 2**20)))
        mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        for algo in ("xxh3_128", "blake2b"):
            t = best(lambda: integrity.manifest(root, algo), args.repeats)
            print(f"manifest {algo:9s}: {t * 1000:7.1f} ms for {mb:.0f} MB ({mb / t:7.0f} MB/s)")
        record = integrity.manifest(root)
        t = best(lambda: integrity.verify(root, record), args.repeats)
        print(f"verify   xxh3_128 : {t * 1000:7.1f} ms for {mb:.0f} MB ({mb / t:7.0f} MB/s)")
    weights = [torch.randn(5_000_000) for _ in range(5)]  # 25 M fp32 = 100 MB
    t = best(lambda: all(bool(torch.isfinite(w).all()) for w in weights), args.repeats)
    print(f"isfinite(w).all() over 25 M fp32 weights: {t * 1000:.1f} ms (torch threads {torch.get_num_threads()})")
    t = best(lambda: all(bool(torch.isfinite(w.sum())) for w in weights), args.repeats)
    print(f"isfinite(w.sum()) over 25 M fp32 weights (the save check): {t * 1000:.1f} ms")


if __name__ == "__main__":
    main()
