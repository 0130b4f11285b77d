"""What a compat patch is, and the helpers every family uses to apply and check one.

A :class:`Patch` is a named, idempotent change to one megatron-core site plus an
``upstream_check`` that raises :class:`UpstreamChanged` when the upstream code under it no longer
has the form the patch was written for. Replacements go through :func:`set_attr`, which remembers
the upstream object once, so checks keep reading the upstream code after the patch is applied.
"""

from __future__ import annotations

import importlib
import inspect
import types
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, Tuple

__all__ = [
    "Family",
    "Patch",
    "UpstreamChanged",
    "is_marked",
    "mark",
    "module",
    "require",
    "require_attr",
    "require_module",
    "set_attr",
    "upstream_attr",
]


class UpstreamChanged(AssertionError):
    """The megatron-core code a patch adapts no longer looks the way the patch expects."""


class Family(str, Enum):
    """Why a patch exists; one module of ``mod_train.compat`` per family."""

    rng = "rng"  # CUDA RNG state/seed in megatron's tensor-parallel RNG tracker
    moe = "moe"  # MoE token dispatcher assumptions about CUDA tensors; a torch.compile'd router op
    sequence_parallel = "sequence-parallel"  # SP collectives and norms without NCCL / Apex / TE
    device_site = "device-site"  # `torch.cuda` / `device="cuda"` / `.cuda()` on the training path
    process_groups = "process-groups"  # groups megatron creates again on every initialization (gloo threads)
    # Not about the CPU: a gap when Transformer Engine is not installed, on any device.
    no_te = "no-te"


@dataclass(frozen=True)
class Patch:
    name: str
    family: Family
    target: str  # the upstream object(s) adapted, human-readable
    apply: Callable[[], None]  # idempotent
    upstream_check: Callable[[], None]  # raises UpstreamChanged
    # True: applied only on a CPU-only setup. False: also applied on GPUs when the dependency
    # whose absence it covers (Transformer Engine) is missing.
    cpu_only: bool = True


# (owner qualname, attr) -> upstream object, recorded on first replacement. Process-wide because
# the patched megatron modules are.
_ORIGINALS: Dict[Tuple[str, str], object] = {}

# Attribute set on wrapper functions, so applying a patch twice never wraps a wrapper.
_MARK = "_mod_train_compat"


def mark(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


def is_marked(fn) -> bool:
    return bool(getattr(fn, _MARK, False))


def module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def _key(owner, attr: str) -> Tuple[str, str]:
    if isinstance(owner, types.ModuleType):
        return owner.__name__, attr
    return f"{owner.__module__}.{owner.__qualname__}", attr


def set_attr(owner, attr: str, value) -> None:
    """Replace ``owner.attr``, remembering the upstream object once (idempotent)."""
    key = _key(owner, attr)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = owner.__dict__[attr] if attr in vars(owner) else getattr(owner, attr)
    setattr(owner, attr, value)


def upstream_attr(owner, attr: str):
    """The upstream (unpatched) ``owner.attr``."""
    key = _key(owner, attr)
    if key in _ORIGINALS:
        return _ORIGINALS[key]
    if not hasattr(owner, attr):
        raise UpstreamChanged(f"{owner.__name__}.{attr} no longer exists")
    return vars(owner)[attr] if attr in vars(owner) else getattr(owner, attr)


def _source(obj) -> str:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return inspect.getsource(obj)


def require(where: str, source: str, *snippets: str) -> None:
    for snippet in snippets:
        if snippet not in source:
            raise UpstreamChanged(f"{where}: expected upstream code {snippet!r} is gone; "
                                  "re-check the mod_train.compat patch for it")


def require_module(module_name: str, *snippets: str) -> None:
    require(module_name, inspect.getsource(module(module_name)), *snippets)


def require_attr(owner, attr: str, *snippets: str) -> None:
    where = f"{getattr(owner, '__name__', owner)}.{attr}"
    require(where, _source(upstream_attr(owner, attr)), *snippets)
