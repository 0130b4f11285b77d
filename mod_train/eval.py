"""`mod-eval`: lm-evaluation-harness on a training checkpoint, scores logged to the run's MLflow run.

    mod-eval --checkpoint runs/<run>/checkpoints [--iter N] --tasks tests/data/lm_eval/choice.yaml [--limit N]
             [--path ours|hf|both] [--hf-dir DIR] [--no-mlflow]

``ours`` scores with our model in one process (MoD layers on causal routing); ``hf`` through the
Hugging Face export and lm-eval's own HFLM; ``both`` runs both (they agree). Needs the extra `hf`.
The logic is ``mod_train.evaluation.lm_eval_run``'s; this module is the command line only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mod_train.checkpoint.read import CheckpointReadError
    from mod_train.distributed.world_of_one import SingleProcessError
    from mod_train.hf.deps import MissingExtraError
    from mod_train.hf.export import HFExportError
    from mod_train.inference.errors import InferenceError

    p = argparse.ArgumentParser(prog="mod-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (runs/<run>/checkpoints) or an iter_* dir")
    p.add_argument("--iter", "--step", dest="iter", default="latest", help="step to evaluate, or 'latest'")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names or local task YAML files")
    p.add_argument("--limit", type=int, help="at most N documents per task")
    p.add_argument("--path", choices=("ours", "hf", "both"), default="ours")
    p.add_argument("--hf-dir", help="an existing export of this checkpoint (--path hf/both); default: export now")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the scores to the run's MLflow run")
    args = p.parse_args(argv)
    from mod_train.evaluation.lm_eval_run import evaluate_checkpoint

    try:
        scores = evaluate_checkpoint(args.checkpoint, args.tasks, args.iter, args.limit, args.path, args.hf_dir,
                                     log_mlflow=not args.no_mlflow)
    except (InferenceError, CheckpointReadError, SingleProcessError, HFExportError, MissingExtraError,
            FileNotFoundError) as e:
        raise SystemExit(f"mod-eval: error: {e}") from None
    print(json.dumps(scores, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
