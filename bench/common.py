"""What the benchmarks share: a preset's config and FLOPs, and one `mod-train` run in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def model_config(model: str, overrides: Sequence[str], world_size: int = 1) -> Tuple[object, object]:
    """(Config, Derived) of ``model=<model>`` plus overrides, validated without reading files."""
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate

    cfg = to_config(compose([f"model={model}", *overrides]))
    if cfg.model.vocab_size is None:  # real data: the tokenizer says
        from mod_train.config.validate import tokenizer_vocab_size

        cfg.model.vocab_size = tokenizer_vocab_size(cfg.data.tokenizer_model)
    return cfg, validate(cfg, world_size=world_size, check_files=False, has_cuda=torch.cuda.is_available())


def train_flops_per_token(cfg, derived) -> float:
    from mod_train.model.flops import train_flops_per_token as count

    return count(cfg.model, derived.ffn_hidden_size, derived.padded_vocab_size, derived.mod_layers,
                 derived.mod_capacities, derived.moe_layers)


def run_mod_train(overrides: Sequence[str], run_dir: Path, nproc: int = 1) -> Tuple[int, str, List[dict]]:
    """Train with ``mod-train <overrides> train.run_dir=<run_dir>``: (exit code, last stderr line,
    the rows of its metrics.jsonl)."""
    launcher = [sys.executable, "-m", "mod_train.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "mod_train.train"]
    r = subprocess.run([*launcher, *overrides, f"train.run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True)
    last = last_line(r.stderr)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return r.returncode, last, rows


def last_line(text: str) -> str:
    """The last non-empty line of a process's output (where its error is)."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]
