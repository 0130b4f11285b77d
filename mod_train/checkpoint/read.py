"""The one reader of checkpoint files: which ``iter_*`` directory, what its complete.json says, and
the model weights it holds. Training (``state.Checkpointer``), ``mod-generate`` and ``mod-export``
read checkpoints only through these functions. The directory protocol (staging, commit, latest,
keep-K) is layout.py's; the layout-free format itself (megatron dist-checkpointing) is model_io.py's.

Inside one ``iter_N/``::

    complete.json        step, train_state, layout, the resolved config under "config"
    model/               layout-free weights (model_io.save_model), loadable under any layout
    optimizer/           layout-free Adam moments (+ fp32 masters under bf16; model_io.save_optimizer)
    rng/rank_XXXXX.pt    per-rank RNG states
    state/               DeepSpeed's files (model shards, ZeRO partitions, LR scheduler): only in
                         checkpoints of an older mod-train or written with checkpoint.deepspeed_files

Every failure is a :class:`CheckpointReadError` whose message names the file or directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from mod_train.checkpoint.layout import COMPLETE_FILE, CheckpointDir, iter_name, read_metadata
from mod_train.checkpoint.model_io import MODEL_DIR, is_model_dir

__all__ = [
    "DS_TAG", "MODEL_DIR", "OPTIM_DIR", "RNG_DIR", "CheckpointReadError", "resolve_iter_dir", "read_complete",
    "saved_config", "saved_layout", "saved_train_state", "has_model_dir", "load_model_dir", "load_weights_from",
    "saved_padded_vocab", "read_rng_state", "check_deepspeed_readable", "load_deepspeed_model_state",
    "match_norm_keys", "load_deepspeed_weights", "has_deepspeed_files",
]

DS_TAG = "state"  # DeepSpeed's sub-directory inside iter_N/ (its checkpoint "tag")
OPTIM_DIR = "optimizer"  # layout-free optimizer state (model_io.save_optimizer)
RNG_DIR = "rng"
# DeepSpeed's file of model-parallel rank 0 (ZeRO 0-2) and of data-parallel rank 0 under ZeRO-3.
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"

PathLike = Union[str, os.PathLike]


class CheckpointReadError(RuntimeError):
    """A checkpoint file or directory that cannot be read as asked; the message names it."""


# ----------------------------------------------------------------------------- which directory
def resolve_iter_dir(path: PathLike, iteration: Optional[str] = "latest") -> Path:
    """The ``iter_*`` directory to read: ``path`` is a checkpoint root (``iteration`` picks a step or
    ``"latest"``) or already one ``iter_*`` directory. Its files are checked against the sizes and
    checksums in complete.json first (integrity.py; read-only): a damaged file is named here, not
    found later by the reader of that file."""
    from mod_train.checkpoint import integrity

    iter_dir = _locate_iter_dir(path, iteration)
    verdict = integrity.verify(iter_dir, read_complete(iter_dir))
    if not verdict.usable:
        raise CheckpointReadError(f"checkpoint {iter_dir} is damaged: {verdict.problem} (mod-ckpt verify "
                                  f"{iter_dir.parent} lists the good ones; pass one with --iter)")
    return iter_dir


def _locate_iter_dir(path: PathLike, iteration: Optional[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointReadError(f"checkpoint path {p} does not exist (give the checkpoint root, e.g. "
                                  f"runs/<run>/checkpoints, or one of its iter_* directories)")
    if not p.is_dir():
        raise CheckpointReadError(f"checkpoint path {p} is not a directory")
    if (p / COMPLETE_FILE).is_file():
        if iteration not in (None, "latest"):
            raise CheckpointReadError(f"{p} is already a single checkpoint; drop --iter or pass its root directory")
        return p
    root = CheckpointDir(p)
    available = root.list_complete()
    names = ", ".join(d.name for _, d in available) or "none"
    if not available:
        raise CheckpointReadError(f"no complete checkpoint under {p} (no iter_*/{COMPLETE_FILE}); complete "
                                  f"checkpoints: none")
    if iteration in (None, "latest"):
        found = root.find_latest()
        assert found is not None  # list_complete() is not empty
        return found[1]
    try:
        step = int(iteration)
    except ValueError:
        raise CheckpointReadError(f"--iter must be a step number or 'latest', got {iteration!r}") from None
    for s, d in available:
        if s == step:
            return d
    raise CheckpointReadError(f"no complete checkpoint for step {step} ({iter_name(step)}) under {p}; "
                              f"complete checkpoints: {names}")


# ----------------------------------------------------------------------------- complete.json
def read_complete(iter_dir: PathLike) -> dict:
    """``<iter_dir>/complete.json`` as a dict."""
    try:
        return read_metadata(iter_dir)
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"cannot read {Path(iter_dir) / COMPLETE_FILE}: {e}") from e


def saved_config(metadata: dict, source: PathLike = "complete.json"):
    """The typed Config a checkpoint was written with (``metadata["config"]``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mod_train.config.schema import Config

    if not isinstance(metadata.get("config"), dict):
        raise CheckpointReadError(f"{source} has no 'config' entry: this checkpoint was not written by mod-train")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), metadata["config"]))
    except (OmegaConfBaseException, ValueError) as e:
        raise CheckpointReadError(f"the config saved in {source} does not fit this mod-train's schema: {e}") from e


def saved_layout(iter_dir: PathLike) -> Optional[dict]:
    """The parallel layout recorded in complete.json (None for checkpoints that predate it)."""
    layout = read_complete(iter_dir).get("layout")
    return dict(layout) if isinstance(layout, dict) else None


def saved_train_state(iter_dir: PathLike) -> dict:
    """complete.json's ``train_state`` (step, consumed samples, MLflow run id, FLOPs)."""
    state = read_complete(iter_dir).get("train_state")
    if not isinstance(state, dict):
        raise CheckpointReadError(f"{Path(iter_dir) / COMPLETE_FILE} has no 'train_state' entry")
    return state


# ----------------------------------------------------------------------------- layout-free weights
def has_model_dir(iter_dir: PathLike) -> bool:
    """True when ``iter_dir`` holds layout-free weights (``model/``, written at every save)."""
    return is_model_dir(Path(iter_dir) / MODEL_DIR)


def load_model_dir(chunks: Sequence[torch.nn.Module], iter_dir: PathLike) -> None:
    """Weights from ``<iter_dir>/model`` into this rank's chunks, under any layout (collective)."""
    model_dir = Path(iter_dir) / MODEL_DIR
    if not is_model_dir(model_dir):
        raise CheckpointReadError(f"{model_dir} is not a layout-free model directory (no metadata.json)")
    _load_model_files(chunks, model_dir)


def load_weights_from(chunks: Sequence[torch.nn.Module], path: PathLike) -> Path:
    """Weights for ``checkpoint.init_from``: ``path`` is a ``save_model`` directory or a checkpoint
    ``iter_N/`` (its ``model/``), written under any layout (collective). Returns the directory read."""
    from mod_train.checkpoint.model_io import model_dir_of

    model_dir = model_dir_of(path)
    if not is_model_dir(model_dir):
        raise CheckpointReadError(f"{Path(path).expanduser()} holds no layout-free weights: give a checkpoint "
                                  f"iter_* directory (with model/) or a directory written by model_io.save_model")
    _load_model_files(chunks, model_dir)
    return model_dir


def _load_model_files(chunks: Sequence[torch.nn.Module], model_dir: Path) -> None:
    from mod_train.checkpoint.model_io import load_model

    try:
        load_model(chunks, model_dir)
    except Exception as e:  # megatron's reader fails on a damaged directory with any type (even AttributeError)
        raise CheckpointReadError(f"cannot load the weights in {model_dir}: {e}") from e


def saved_padded_vocab(iter_dir: PathLike) -> Optional[int]:
    """Rows of the embedding / output layer stored in ``<iter_dir>/model`` (None without ``model/``)."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    model_dir = Path(iter_dir) / MODEL_DIR
    if not is_model_dir(model_dir):
        return None
    try:
        meta = load_tensors_metadata(str(model_dir))
    except Exception as e:  # torch.distributed.checkpoint raises its own types for a corrupt .metadata
        raise CheckpointReadError(f"cannot read the tensor metadata in {model_dir}: {e}") from e
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in meta:
            return int(meta[key].global_shape[0])
    return None


def read_rng_state(iter_dir: PathLike, rank: int) -> Optional[dict]:
    """The RNG states rank ``rank`` saved, or None if the checkpoint has none for it."""
    path = Path(iter_dir) / RNG_DIR / f"rank_{rank:05d}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # torch.load raises several types for a truncated/corrupt pickle
        raise CheckpointReadError(f"cannot read {path}: {e}") from e


# ----------------------------------------------------------------------------- DeepSpeed's files
def has_deepspeed_files(iter_dir: PathLike) -> bool:
    """True when ``iter_dir`` holds DeepSpeed's own files (``state/``: older mod-train, or written
    with checkpoint.deepspeed_files=true)."""
    return (Path(iter_dir) / DS_TAG).is_dir()


def check_deepspeed_readable(cfg) -> None:
    """DeepSpeed's files can be read in one process only for a TP1/PP1/EP1/CP1 training layout."""
    par = cfg.parallel
    values = (("tp", par.tp, 1), ("pp", par.pp, 1), ("vpp", par.vpp or None, None), ("ep", par.ep, 1),
              ("cp", par.cp, 1))
    bad = [f"parallel.{k}={v}" for k, v, fine in values if v != fine]
    if bad:
        raise CheckpointReadError(
            f"this checkpoint was written with {', '.join(bad)}; without a layout-free 'model/' directory only "
            f"checkpoints written with parallel.tp=1 and parallel.pp=1 (no virtual pipeline, ep=1, cp=1) can be "
            f"read in one process, with any data-parallel size and ZeRO stage 0-3")


def _strip_chunk_prefix(state: dict, source: Path) -> dict:
    """ModelChunks keys ``0.<name>`` -> ``<name>`` (the GPTModel of chunk 0)."""
    if any(k.startswith("1.") for k in state):
        raise CheckpointReadError(f"{source} holds more than one model chunk (virtual pipeline); only tp=1 pp=1 "
                                  f"checkpoints can be read from DeepSpeed's files")
    if all(k.startswith("0.") for k in state):
        return {k[2:]: v for k, v in state.items()}
    return dict(state)


def load_deepspeed_model_state(iter_dir: PathLike, zero_stage: Optional[int] = None) -> dict:
    """The GPTModel state dict of chunk 0 from ``<iter_dir>/state`` (DeepSpeed, any ZeRO stage)."""
    iter_dir = Path(iter_dir)
    ds_dir = iter_dir / DS_TAG
    if not ds_dir.is_dir():
        raise CheckpointReadError(f"{iter_dir} has no DeepSpeed '{DS_TAG}' directory: not a mod-train checkpoint")
    other_mp = sorted(p.name for p in ds_dir.glob("*mp_rank_*_model_states.pt") if "mp_rank_00_" not in p.name)
    if other_mp:
        raise CheckpointReadError(f"{ds_dir} holds model-parallel shards ({other_mp[0]}, ...): only checkpoints "
                                  f"written with parallel.tp=1 and parallel.pp=1 can be read from DeepSpeed's files")
    plain, zero3 = ds_dir / MODEL_STATES, ds_dir / ZERO3_MODEL_STATES
    if plain.is_file() and zero_stage != 3:
        try:
            blob = torch.load(plain, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated or corrupt pickle
            raise CheckpointReadError(f"cannot read {plain}: {e}") from e
        if not isinstance(blob, dict) or blob.get("module") is None:
            raise CheckpointReadError(f"{plain} has no 'module' entry")
        return _strip_chunk_prefix(blob["module"], plain)
    if zero3.is_file() or zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(iter_dir), tag=DS_TAG)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointReadError(f"cannot gather the ZeRO-3 weights in {ds_dir}: {e}") from e
        return _strip_chunk_prefix(state, ds_dir)
    raise CheckpointReadError(f"{ds_dir} has neither {MODEL_STATES} nor {ZERO3_MODEL_STATES}")


# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
TE_TO_LOCAL_NORMS: Tuple[Tuple[str, str], ...] = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)


def match_norm_keys(state: dict, wanted: set) -> dict:
    """Rename fused-norm keys between Transformer Engine and local specs; drop TE extra state."""
    out = {}
    for key, value in state.items():
        if key not in wanted:
            for te, local in TE_TO_LOCAL_NORMS:
                renamed = next((key[: -len(a)] + b for a, b in ((te, local), (local, te))
                                if key.endswith(a) and key[: -len(a)] + b in wanted), None)
                if renamed is not None:
                    key = renamed
                    break
        if key.endswith("._extra_state") and key not in wanted:
            continue
        out[key] = value
    return out


def load_deepspeed_weights(model: torch.nn.Module, iter_dir: PathLike, cfg) -> None:
    """Weights of a checkpoint without ``model/`` into a one-process GPTModel, from DeepSpeed's files
    (possible for a TP1/PP1/EP1 training layout only; ``cfg``: the config it was written with)."""
    check_deepspeed_readable(cfg)
    state = load_deepspeed_model_state(iter_dir, cfg.parallel.zero_stage)
    state = match_norm_keys(state, set(model.state_dict().keys()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise CheckpointReadError(
            f"{Path(iter_dir) / DS_TAG} does not match the model built from its config: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
