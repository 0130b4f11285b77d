"""Flatten a nested config into MLflow params.

{"model": {"hidden_size": 64}} -> {"model.hidden_size": "64"}.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Sequence


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
