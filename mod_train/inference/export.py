"""One training checkpoint (any parallel layout) -> one layout-free ``.pt`` file (``mod-export``).

The file holds the full, unsharded state dict of the model as a TP=1 / PP=1 megatron-core
GPTModel names it (``decoder.layers.3.mlp.linear_fc1.weight``, global layer numbers), so
``GPTModel.load_state_dict`` of a model built from the stored config takes it as is::

    {"format": "mod-train-export/1", "state_dict": {...}, "config": {...resolved config...},
     "step": 1000, "vocab_size": 512, "padded_vocab_size": 512, "layout": {...}, "source": "<iter dir>"}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from mod_train.inference.errors import InferenceError
from mod_train.inference.loader import LoadedModel, load_model, open_checkpoint

EXPORT_FORMAT = "mod-train-export/1"


def export_record(loaded: LoadedModel) -> dict:
    """The export record of a loaded checkpoint (tensors copied to CPU)."""
    from mod_train.config.load import to_plain_dict

    state = {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()
             if not k.endswith("_extra_state") and torch.is_tensor(v)}
    saved = loaded.source.config
    return {
        "format": EXPORT_FORMAT,
        "state_dict": state,
        "config": to_plain_dict(saved),
        "step": loaded.source.step,
        "vocab_size": saved.model.vocab_size,
        "padded_vocab_size": loaded.derived.padded_vocab_size,
        "layout": loaded.source.metadata.get("layout"),
        "source": str(loaded.source.iter_dir),
    }


def export_checkpoint(checkpoint: Union[str, Path], out: Union[str, Path], iteration: Optional[str] = "latest") -> Path:
    """Write the export of ``checkpoint`` (a root or an ``iter_*`` directory) to ``out``; returns
    ``out``. Runs in this process (a world of one)."""
    from mod_train.distributed.world_of_one import world_of_one

    source = open_checkpoint(checkpoint, iteration)
    with world_of_one():
        record = export_record(load_model(source))
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
        raise InferenceError(f"{path} is not a mod-export file ({EXPORT_FORMAT})")
    return record
