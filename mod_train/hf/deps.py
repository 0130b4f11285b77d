"""The optional ``hf`` extra: one check with a message that names it."""

from __future__ import annotations

import importlib

EXTRA_HINT = "pip install -e '.[hf]'  (the optional extra `hf`: transformers, safetensors, lm-eval)"


class MissingExtraError(ImportError):
    pass


def require(*modules: str) -> None:
    """Import ``modules`` or fail naming the extra that provides them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{', '.join(missing)} not installed: {EXTRA_HINT}")
