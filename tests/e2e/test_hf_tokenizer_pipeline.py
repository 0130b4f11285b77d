"""Hugging Face tokenizer end to end: train a byte-level BPE -> tokenize -> train a few steps -> generate."""

import json
import os
import subprocess
import sys

import pytest

from data_prep import BUNDLED_CORPUS
from tests.helpers_train import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_hf_tokenizer_train_tokenize_train_generate(tmp_path):
    from data_prep.tokenize_corpus import tokenize_corpus
    from data_prep.train_hf_tokenizer import train_hf_bpe

    corpus = tmp_path / "corpus.jsonl"
    with open(BUNDLED_CORPUS, encoding="utf-8") as f:
        corpus.write_text("".join(line for _, line in zip(range(600), f)), encoding="utf-8")
    info = train_hf_bpe([str(corpus)], str(tmp_path / "tok"), 512)
    s = tokenize_corpus([str(corpus)], str(tmp_path / "tok"), str(tmp_path / "ds"), workers=1, progress=False)
    assert (s.tokenizer_kind, s.vocab_size, s.eod_id) == ("hf", info.vocab_size, 3)

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mod_train.train", "model=tiny", "model.num_layers=2",
                        "model.seq_length=32", "parallel.micro_batch_size=2", f"data.tokenizer_model={tmp_path / 'tok'}",
                        f"data.paths=[{tmp_path / 'ds'}]", "train.max_steps=4", "train.log_interval=1",
                        "train.eval_interval=1000", "optim.warmup_steps=1", f"train.run_dir={run}",
                        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["lm loss"] for row in rows if "lm loss" in row]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)

    prompt = "def main("
    g = subprocess.run([sys.executable, "-m", "mod_train.generate", "--checkpoint", str(run / "checkpoints"),
                        "--prompt", prompt, "--max-new-tokens", "8", "--greedy"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.startswith(prompt) and len(g.stdout.strip()) > len(prompt)
