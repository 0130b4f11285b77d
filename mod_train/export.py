"""`mod-export`: one training checkpoint (any parallel layout) -> one layout-free ``.pt`` file.

    mod-export --checkpoint runs/<run>/checkpoints [--iter N | --iter latest] --out model.pt

The file holds the full, unsharded state dict of the model as a TP=1 / PP=1 megatron-core
GPTModel names it (``decoder.layers.3.mlp.linear_fc1.weight``, global layer numbers), so
``GPTModel.load_state_dict`` of a model built from the stored config takes it as is::

    {"format": "mod-train-export/1", "state_dict": {...}, "config": {...resolved config...},
     "step": 1000, "vocab_size": 512, "padded_vocab_size": 512, "source": "<iter dir>"}

It runs in a single process (no torchrun): the checkpoint's layout-free ``model/`` directory
(megatron dist-checkpointing, written at every save) is loaded into a TP1/PP1 model built from
the stored config. Checkpoints written before ``model/`` existed are exported only if their
layout was TP1/PP1 (from DeepSpeed's files, as mod-generate reads them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

EXPORT_FORMAT = "mod-train-export/1"


class ExportError(RuntimeError):
    """A checkpoint mod-export cannot convert; the message says why."""


def resolve_iter_dir(path: Union[str, Path], iteration: str = "latest") -> Path:
    """``path`` is an ``iter_*`` directory, or a checkpoint root where ``iteration`` picks one."""
    from mod_train.generate import GenerateError, resolve_checkpoint

    try:
        return resolve_checkpoint(str(path), iteration)
    except GenerateError as e:
        raise ExportError(str(e)) from None


def _padded_vocab(model_dir: Path) -> Optional[int]:
    from megatron.core.dist_checkpointing import load_tensors_metadata

    meta = load_tensors_metadata(str(model_dir))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in meta:
            return int(meta[key].global_shape[0])
    return None


def export_state(iter_dir: Path) -> dict:
    """The export record for one ``iter_*`` directory (inside ``world_of_one()``)."""
    from mod_train.checkpoint.layout import read_metadata
    from mod_train.checkpoint.model_io import MODEL_DIR, is_model_dir, load_model
    from mod_train.config.load import to_plain_dict
    from mod_train.config.validate import ConfigError, validate
    from mod_train.distributed.world_of_one import config_from_metadata, single_process_layout
    from mod_train.model.build import build_model_chunks

    try:
        metadata = read_metadata(iter_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {iter_dir}/complete.json: {e}") from e
    try:
        cfg = config_from_metadata(metadata)
    except ValueError as e:
        raise ExportError(str(e)) from None
    model_dir = iter_dir / MODEL_DIR
    layout_free = is_model_dir(model_dir)
    one = single_process_layout(cfg)
    if one.model.vocab_size is None:
        # Only the padded size shapes the model; the tokenizer need not be around.
        padded = _padded_vocab(model_dir) if layout_free else None
        if padded is None:
            from mod_train.config.validate import tokenizer_vocab_size

            try:
                padded = tokenizer_vocab_size(cfg.data.tokenizer_model)
            except ConfigError as e:
                raise ExportError(f"the vocabulary size is unknown: {e}") from e
        one.model.vocab_size = padded
    try:
        derived = validate(one, world_size=1, check_files=False, has_cuda=torch.cuda.is_available())
    except ConfigError as e:
        raise ExportError(f"the checkpoint's config does not validate: {e}") from e
    chunks = build_model_chunks(one, derived)
    if layout_free:
        load_model(chunks, model_dir)
    else:
        _load_legacy(chunks[0], iter_dir, cfg)
    state = {k: v.detach().cpu().clone() for k, v in chunks[0].state_dict().items()
             if not k.endswith("_extra_state") and torch.is_tensor(v)}
    return {
        "format": EXPORT_FORMAT,
        "state_dict": state,
        "config": to_plain_dict(cfg),
        "step": int(metadata.get("step", 0)),
        "vocab_size": cfg.model.vocab_size,
        "padded_vocab_size": derived.padded_vocab_size,
        "layout": metadata.get("layout"),
        "source": str(iter_dir),
    }


def _load_legacy(model, iter_dir: Path, cfg) -> None:
    """A checkpoint without ``model/``: only TP1/PP1 layouts can be read (DeepSpeed's files)."""
    from mod_train.generate import GenerateError, check_supported_layout, load_model_state, load_weights

    try:
        check_supported_layout(cfg)
        load_weights(model, load_model_state(iter_dir, cfg.parallel.zero_stage))
    except GenerateError as e:
        raise ExportError(f"{iter_dir} has no layout-free 'model/' directory (written by an older mod-train) "
                          f"and its DeepSpeed files cannot be read in one process: {e}") from e


def export_checkpoint(checkpoint: Union[str, Path], out: Union[str, Path], iteration: str = "latest") -> Path:
    """Write the export of ``checkpoint`` to ``out``; returns ``out``. Single process."""
    iter_dir = resolve_iter_dir(checkpoint, iteration)
    from mod_train.distributed.world_of_one import SingleProcessError, world_of_one

    try:
        with world_of_one():
            record = export_state(iter_dir)
    except SingleProcessError as e:
        raise ExportError(str(e)) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, out)
    return out


def load_export(path: Union[str, Path]) -> dict:
    """Read an export file (state_dict, config, ...) and check its format."""
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} is not a mod-export file ({EXPORT_FORMAT})")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mod-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (runs/<run>/checkpoints) or an iter_* dir")
    p.add_argument("--iter", default="latest", help="step to export, or 'latest' (default)")
    p.add_argument("--out", required=True, help="the .pt file to write")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.iter)
    except ExportError as e:
        raise SystemExit(f"mod-export: error: {e}") from None
    record = load_export(out)
    n = sum(v.numel() for v in record["state_dict"].values())
    print(f"exported {record['source']} (step {record['step']}, {len(record['state_dict'])} tensors, "
          f"{n} parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
