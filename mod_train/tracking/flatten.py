"""Flatten a nested config into MLflow params.

{"model": {"hidden_size": 64}} -> {"model.hidden_size": "64"}.
Config keys that may change between the invocations of one run (stop, then resume) are logged
as tags ``invocation.<key>`` instead: MLflow params are immutable. The trainer and
mod-mlflow-sync both split a config with ``run_params``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Sequence, Tuple

# Config keys that may change when a stopped run is resumed (logged as tags, not params).
PER_INVOCATION_KEYS = ("train.exit_interval", "checkpoint.resume")
INVOCATION_TAG_PREFIX = "invocation."


def _plain(value: Any) -> Any:
    """Nested Mappings/Sequences (also OmegaConf containers) as dicts/lists for json.dumps."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _flatten_into(out: Dict[str, str], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten_into(out, f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, Mapping) or (
        isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    ):
        # Lists stay one param: "data.paths" -> '["a", "b"]' is what one searches for in the UI.
        out[prefix] = json.dumps(_plain(value), default=str)
    else:
        out[prefix] = str(value)


def flatten_config(cfg: Mapping[str, Any]) -> Dict[str, str]:
    """Dotted keys -> string values. Scalars use str() (None -> "None"), lists/empty dicts JSON."""
    out: Dict[str, str] = {}
    for k, v in cfg.items():
        _flatten_into(out, str(k), v)
    return out


def run_params(cfg: Mapping[str, Any]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(params, tags) of a run for ``cfg``: the flattened config minus ``PER_INVOCATION_KEYS``,
    and those keys as ``invocation.<key>`` tags."""
    params = flatten_config(cfg)
    tags = {INVOCATION_TAG_PREFIX + k: params.pop(k) for k in PER_INVOCATION_KEYS if k in params}
    return params, tags
