"""`make demo`: the whole pipeline on the bundled corpus, on CPU, with the commands a user would type.

1. train a sentencepiece tokenizer            (mod-prep-tokenizer)
2. tokenize into megatron's indexed format     (mod-prep-data, parallel workers)
3. train a tiny GPT on 2 processes, DP=2 ZeRO-1, stopping half-way (train.exit_interval)
4. resume from the latest checkpoint in a second invocation and finish
5. print where the checkpoints, metrics and MLflow store are
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> None:
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    code = subprocess.call(cmd, cwd=REPO)
    if code != 0:
        sys.exit(f"demo: step failed with exit code {code}: {' '.join(cmd)}")
    print(f"  ({time.time() - t0:.1f} s)", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for training")
    args = p.parse_args(argv)

    py = sys.executable
    data = REPO / args.data_dir
    corpus = REPO / "data_prep" / "corpus" / "corpus.jsonl"
    tokenizer = data / "tokenizer.model"
    prefix = data / "corpus_text_document"
    t_start = time.time()

    if not tokenizer.is_file():
        sh([py, "-m", "data_prep.train_tokenizer", "--input", str(corpus), "--output-prefix", str(data / "tokenizer"),
            "--vocab-size", str(args.vocab_size)])
    if not Path(str(prefix) + ".idx").is_file():
        sh([py, "-m", "data_prep.tokenize_corpus", "--input", str(corpus), "--tokenizer-model", str(tokenizer),
            "--output-prefix", str(prefix), "--workers", "2"])

    run_dir = REPO / args.run_dir
    train = [py, "-m", "launch.local", "--nproc", str(args.nproc),
             f"data.tokenizer_model={tokenizer}", f"data.paths=[{prefix}]", f"train.run_dir={run_dir}",
             f"train.max_steps={args.steps}", "train.log_interval=10", "train.eval_interval=50",
             "checkpoint.save_interval=50", "checkpoint.resume=auto", *args.overrides]
    # First invocation stops half-way, as a pre-empted job would; the second resumes and finishes.
    sh(train + [f"train.exit_interval={args.steps // 2}"])
    sh(train)

    from mod_train.tracking import default_tracking_uri

    uri = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("tracking.tracking_uri=")),
               default_tracking_uri(REPO))
    # A taste of the result: sample from the final checkpoint (KV cache, causal MoD routing if any).
    sh([py, "-m", "mod_train.generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", "The",
        "--max-new-tokens", "30", "--temperature", "0.8", "--top-p", "0.9"])
    print(f"""
demo finished in {time.time() - t_start:.0f} s
  checkpoints : {run_dir / 'checkpoints'}   (latest: {(run_dir / 'checkpoints' / 'latest').read_text().strip()})
  metrics     : {run_dir / 'metrics.jsonl'}
  MLflow      : {uri}
                open the UI with: {Path(py).parent / 'mlflow'} ui --backend-store-uri {uri}
""")


if __name__ == "__main__":
    main()
