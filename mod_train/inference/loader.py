"""One loader of a single-process model from any checkpoint, shared by ``mod-generate`` and ``mod-export``.

A checkpoint's layout-free ``model/`` directory (megatron dist-checkpointing, written at every
save) loads into the same model laid out for one process, whatever TP/PP/EP/DP/ZeRO layout the
training used. Checkpoints written before ``model/`` existed are read from DeepSpeed's files, which
needs a TP1/PP1/EP1 training layout (any DP size and ZeRO stage). All file reading goes through
``mod_train.checkpoint.read``.

    source = open_checkpoint("runs/demo/checkpoints", "latest")  # cheap: metadata and config only
    with world_of_one():
        loaded = load_model(source)                              # GPTModel in eval mode
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from mod_train.checkpoint.layout import COMPLETE_FILE
from mod_train.checkpoint.read import (
    check_deepspeed_readable,
    has_model_dir,
    load_deepspeed_weights,
    load_model_dir,
    read_complete,
    resolve_iter_dir,
    saved_config,
    saved_padded_vocab,
)
from mod_train.inference.errors import InferenceError


@dataclass
class CheckpointSource:
    """One checkpoint's directory, complete.json and saved config: all that is known before a model
    is built."""

    iter_dir: Path
    metadata: dict
    config: Any  # mod_train.config.schema.Config, as the training run resolved it
    layout_free: bool  # holds model/ (loadable under any layout)

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))


@dataclass
class LoadedModel:
    """A GPTModel for one process (eval mode) with the config it was built from."""

    model: torch.nn.Module
    config: Any  # the one-process Config (TP=PP=EP=CP=1; vocabulary size known)
    derived: Any  # mod_train.config.validate's derived values (padded vocabulary, ...)
    source: CheckpointSource
    tokenizer: Any = None  # set by load_for_generation


def open_checkpoint(checkpoint, iteration: Optional[str] = "latest") -> CheckpointSource:
    """Resolve ``checkpoint`` (a root or an ``iter_*`` directory) and read its metadata. A checkpoint
    without ``model/`` whose layout cannot be read in one process fails here, before any model is built."""
    iter_dir = resolve_iter_dir(checkpoint, iteration)
    metadata = read_complete(iter_dir)
    cfg = saved_config(metadata, iter_dir / COMPLETE_FILE)
    layout_free = has_model_dir(iter_dir)
    if not layout_free:
        check_deepspeed_readable(cfg)
    return CheckpointSource(iter_dir=iter_dir, metadata=metadata, config=cfg, layout_free=layout_free)


def _vocab_from_files(source: CheckpointSource) -> int:
    """The vocabulary size when the saved config leaves it to the tokenizer: only the padded size
    shapes the model, so the stored embedding's rows do, and the tokenizer need not be around."""
    from mod_train.config.validate import ConfigError, tokenizer_vocab_size

    padded = saved_padded_vocab(source.iter_dir)
    if padded is not None:
        return padded
    try:
        return tokenizer_vocab_size(source.config.data.tokenizer_model)
    except ConfigError as e:
        raise InferenceError(f"the vocabulary size of {source.iter_dir} is unknown: {e}") from e


def load_model(source: CheckpointSource, vocab_size: Optional[int] = None) -> LoadedModel:
    """Build the checkpoint's model for one process and fill its weights. Call inside ``world_of_one()``.

    ``vocab_size``: the tokenizer's, for a config that left it unset (else taken from the files).
    """
    from mod_train.config.validate import ConfigError, validate
    from mod_train.distributed.world_of_one import single_process_layout
    from mod_train.model.build import build_model_chunks

    one = single_process_layout(source.config)
    if one.model.vocab_size is None:
        one.model.vocab_size = vocab_size if vocab_size is not None else _vocab_from_files(source)
    try:
        derived = validate(one, world_size=1, check_files=False, has_cuda=torch.cuda.is_available())
    except ConfigError as e:
        raise InferenceError(f"the config saved in {source.iter_dir / COMPLETE_FILE} does not validate: {e}") from e
    chunks = build_model_chunks(one, derived)
    if source.layout_free:
        load_model_dir(chunks, source.iter_dir)
    else:
        load_deepspeed_weights(chunks[0], source.iter_dir, source.config)
    model = chunks[0]
    model.eval()
    return LoadedModel(model=model, config=one, derived=derived, source=source)


def load_tokenizer_for(source: CheckpointSource, override: Optional[str] = None) -> Tuple[Any, int]:
    """(tokenizer, its vocabulary size): ``override`` or the saved ``data.tokenizer_model``, checked
    against the vocabulary the model was trained with."""
    from mod_train.config.validate import ConfigError, tokenizer_vocab_size
    from mod_train.data.tokenizer import load_tokenizer

    cfg = source.config
    path = override or cfg.data.tokenizer_model
    if not path or not Path(path).exists():  # a .model, a tokenizer.json, or a directory with one
        raise InferenceError(f"tokenizer model {path!r} (data.tokenizer_model of the checkpoint's config) "
                             f"not found from {os.getcwd()}; pass --tokenizer PATH")
    try:
        vocab = tokenizer_vocab_size(path)
    except ConfigError as e:
        raise InferenceError(str(e)) from e
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab:
        raise InferenceError(f"the tokenizer {path} has {vocab} tokens but the model was trained with "
                             f"model.vocab_size={cfg.model.vocab_size}")
    return load_tokenizer(path), vocab


def load_for_generation(checkpoint, iteration: Optional[str] = "latest",
                        tokenizer_path: Optional[str] = None) -> LoadedModel:
    """Model and tokenizer of a checkpoint, ready to sample from. Call inside ``world_of_one()``."""
    source = open_checkpoint(checkpoint, iteration)
    tokenizer, vocab = load_tokenizer_for(source, tokenizer_path)
    loaded = load_model(source, vocab_size=vocab)
    loaded.tokenizer = tokenizer
    return loaded
