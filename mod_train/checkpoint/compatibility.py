"""Does a checkpoint fit this run's model? Checked before any process group or model exists.

Resuming (or ``init_from``) with a changed model shape used to fail deep in the load with a raw
``state_dict`` size mismatch or ``KeyError``. The config a checkpoint was written with is stored
with it (``complete.json`` under ``"config"``; a model directory's info file under ``"config"``),
so the keys that decide the parameters' shapes are compared first and the first difference is
named: ``model.hidden_size: checkpoint 64, this run 128``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mod_train.checkpoint.layout import COMPLETE_FILE, CheckpointDir

# Written by checkpoint.model_io.save_model next to the tensors (its info, with "config").
MODEL_INFO_FILE = "mod_train_model.json"
MODEL_SUBDIR = "model"


class IncompatibleCheckpoint(ValueError):
    """The checkpoint's model differs from this run's; the message names the keys."""


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _layers(model: Dict[str, Any], group: str, enabled: bool) -> Optional[List[int]]:
    if not enabled:
        return []
    g = model.get(group) or {}
    n = int(model.get("num_layers") or 0)
    if g.get("layers") is not None:
        return sorted(set(int(i) for i in g["layers"]))
    every, offset = int(g.get("every") or 1), int(g.get("offset") or 0)
    return [i for i in range(n) if i >= offset and (i - offset) % max(every, 1) == 0]


def _ffn(model: Dict[str, Any]) -> Optional[int]:
    if model.get("ffn_hidden_size"):
        return int(model["ffn_hidden_size"])
    h = int(model.get("hidden_size") or 0)
    # Same default as config.validate.default_ffn_hidden_size (not imported: no config import here).
    return ((int(8 * h / 3) + 63) // 64) * 64 if str(model.get("activation")) == "swiglu" else 4 * h


def shape_signature(config: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """(key, value) pairs of a plain config dict that decide which parameters exist and their shapes."""
    m = config.get("model") or {}
    mod, moe = m.get("mod") or {}, m.get("moe") or {}
    mod_on = bool(mod.get("enabled"))
    moe_on = int(moe.get("num_experts") or 0) > 0
    sig: List[Tuple[str, Any]] = [
        ("model.num_layers", m.get("num_layers")),
        ("model.hidden_size", m.get("hidden_size")),
        ("model.num_attention_heads", m.get("num_attention_heads")),
        ("model.num_query_groups", m.get("num_query_groups") or m.get("num_attention_heads")),
        ("model.ffn_hidden_size", _ffn(m)),
        ("model.normalization", str(m.get("normalization"))),
        ("model.activation", str(m.get("activation"))),
        ("model.position_embedding", str(m.get("position_embedding"))),
        ("model.tie_embeddings", bool(m.get("tie_embeddings"))),
        ("model.make_vocab_size_divisible_by", m.get("make_vocab_size_divisible_by")),
        ("model.mod.enabled", mod_on),
        ("model.mod.layers (resolved from layers/every/offset)", _layers(m, "mod", mod_on)),
        ("model.moe.num_experts", int(moe.get("num_experts") or 0)),
        ("model.moe.layers (resolved from layers/every/offset)", _layers(m, "moe", moe_on)),
    ]
    if str(m.get("position_embedding")) == "learned_absolute":
        sig.append(("model.seq_length", m.get("seq_length")))
    if mod_on:
        sig.append(("model.mod.causal", str(mod.get("causal"))))
        if str(mod.get("causal")) == "predictor":
            sig.append(("model.mod.predictor_hidden", mod.get("predictor_hidden")))
    if moe_on:
        sig += [("model.moe.ffn_hidden_size", moe.get("ffn_hidden_size")),
                ("model.moe.shared_expert_ffn_hidden_size", moe.get("shared_expert_ffn_hidden_size")),
                ("model.moe.mode", str(moe.get("mode"))),
                ("model.moe.num_noop_experts", moe.get("num_noop_experts"))]
    return sig


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def saved_config(path: Path) -> Optional[dict]:
    """The config a checkpoint iter_N/ or a model directory was written with (None: not recorded)."""
    for candidate in (path / COMPLETE_FILE, path / MODEL_SUBDIR / MODEL_INFO_FILE, path / MODEL_INFO_FILE):
        record = _read_json(candidate) if candidate.is_file() else None
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            return record["config"]
    return None


def differences(saved: dict, current: dict) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every shape-deciding key that differs."""
    theirs, ours = dict(shape_signature(saved)), shape_signature(current)
    out = []
    for key, value in ours:
        if key in theirs and theirs[key] != value:
            out.append((key, theirs[key], value))
    vs, vc = _get(saved, "model.vocab_size"), _get(current, "model.vocab_size")
    if vs is not None and vc is not None and vs != vc:
        out.append(("model.vocab_size", vs, vc))
    return out


def check_compatible(path: Path, current: dict, source_key: str) -> None:
    """IncompatibleCheckpoint when ``path`` holds a model of another shape than ``current`` describes."""
    saved = saved_config(path)
    if saved is None:
        return  # written before configs were recorded: the load itself checks
    diff = differences(saved, current)
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in diff)
        hint = ("resume with the checkpoint's model settings, or start a fresh run (another train.run_dir, "
                "or checkpoint.resume=none)" if source_key == "checkpoint.resume" else
                "set the model keys to the checkpoint's, or init_from a checkpoint of this model")
        raise IncompatibleCheckpoint(f"{source_key}: {path} holds a different model than this run's config: "
                                     f"{lines}. To fix: {hint}.")


def check_resume_and_init(cfg_dict: dict, checkpoint_root: Path, resume: str, init_from: Optional[str]) -> Optional[Path]:
    """Resolve ``checkpoint.resume`` like the trainer does and check it (or ``init_from`` for a fresh
    run) against this run's model. Returns the checkpoint that will be resumed (None: fresh run).
    IncompatibleCheckpoint / ValueError (bad resume path) name the key."""
    path = CheckpointDir(checkpoint_root).resolve_resume(resume)
    if path is not None:
        check_compatible(path, cfg_dict, "checkpoint.resume")
        return path
    if init_from and init_from.startswith("hf:"):  # a Hugging Face directory: its config.json vs model=
        from mod_train.hf.import_ import HFImportError, check_hf_init

        try:
            check_hf_init(init_from, cfg_dict)
        except HFImportError as e:
            raise IncompatibleCheckpoint(str(e)) from None
        return None
    if init_from:
        src = Path(init_from).expanduser()
        if not src.exists():
            raise IncompatibleCheckpoint(f"checkpoint.init_from: {src} does not exist: point it at a checkpoint "
                                         f"iter_N/ directory or a model directory written by save_model.")
        check_compatible(src, cfg_dict, "checkpoint.init_from")
    return None
