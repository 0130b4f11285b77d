"""`mod-export`: one training checkpoint (any parallel layout) -> one layout-free ``.pt`` file.

    mod-export --checkpoint runs/<run>/checkpoints [--iter N | --iter latest] --out model.pt

Runs in a single process (no torchrun). The file format and the conversion are
``mod_train.inference.export``'s; the model comes from the loader ``mod-generate`` uses too.
This module is the command line only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mod_train.checkpoint.read import CheckpointReadError
from mod_train.inference.errors import InferenceError
from mod_train.inference.export import export_checkpoint, load_export


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mod_train.distributed.world_of_one import SingleProcessError

    p = argparse.ArgumentParser(prog="mod-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (runs/<run>/checkpoints) or an iter_* dir")
    p.add_argument("--iter", default="latest", help="step to export, or 'latest' (default)")
    p.add_argument("--out", required=True, help="the .pt file to write (--format hf: a directory)")
    p.add_argument("--step", dest="iter", help="alias of --iter")
    p.add_argument("--format", choices=("pt", "hf"), default="pt",
                   help="pt: one layout-free .pt (default); hf: a Hugging Face transformers directory (mod_train.hf)")
    p.add_argument("--tokenizer", help="--format hf: the tokenizer to convert (default: the checkpoint's data.tokenizer_model)")
    p.add_argument("--no-tokenizer", action="store_true", help="--format hf: write the model without a tokenizer")
    args = p.parse_args(argv)
    if args.format == "hf":
        return _export_hf(args)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.iter)
        record = load_export(out)
    except (InferenceError, CheckpointReadError, SingleProcessError) as e:
        raise SystemExit(f"mod-export: error: {e}") from None
    n = sum(v.numel() for v in record["state_dict"].values())
    print(f"exported {record['source']} (step {record['step']}, {len(record['state_dict'])} tensors, "
          f"{n} parameters) to {out}")
    return 0


def _export_hf(args) -> int:
    from mod_train.distributed.world_of_one import SingleProcessError
    from mod_train.hf.deps import MissingExtraError
    from mod_train.hf.export import HFExportError, export_checkpoint_hf

    try:
        out, target = export_checkpoint_hf(args.checkpoint, args.out, args.iter, args.tokenizer,
                                           with_tokenizer=not args.no_tokenizer)
    except (InferenceError, CheckpointReadError, SingleProcessError, HFExportError, MissingExtraError) as e:
        raise SystemExit(f"mod-export: error: {e}") from None
    print(f"exported {args.checkpoint} as a Hugging Face {target.value} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
