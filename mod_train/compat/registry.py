"""The one list of compat patches and the rules for when each applies.

* CPU-only setup (no CUDA): every patch, in :data:`PATCHES` order.
* Any device without Transformer Engine: the patches with ``cpu_only=False`` (family ``no-te``).
* Otherwise nothing: on a GPU with TE the code path is megatron-core's own, untouched.

Every application is idempotent and recorded, so :meth:`PatchRegistry.applied` names what is in
effect in this process.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from mod_train.compat import device_sites, moe, no_te, process_groups, rng, sequence_parallel
from mod_train.compat.patch import Patch

__all__ = ["PATCHES", "REGISTRY", "PatchRegistry", "transformer_engine_available"]

PATCHES: Tuple[Patch, ...] = (
    *rng.PATCHES,
    *no_te.PATCHES,
    *moe.PATCHES,
    device_sites.TIED_EMBEDDING_PATCH,
    *sequence_parallel.PATCHES,
    *device_sites.PATCHES,
    *process_groups.PATCHES,
)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class PatchRegistry:
    """A set of named patches, applied at most once each.

    ``cuda_available`` / ``te_available``: how the registry asks about the setup (injected so a
    test can ask "what would a GPU do" without a GPU).
    """

    def __init__(self, patches: Sequence[Patch],
                 cuda_available: Callable[[], bool] = torch.cuda.is_available,
                 te_available: Callable[[], bool] = transformer_engine_available) -> None:
        names = [p.name for p in patches]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate patch names in {names}")
        self.patches: Tuple[Patch, ...] = tuple(patches)
        self._cuda_available = cuda_available
        self._te_available = te_available
        self._applied: List[str] = []

    def names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.patches)

    def get(self, name: str) -> Patch:
        for patch in self.patches:
            if patch.name == name:
                return patch
        raise KeyError(f"no compat patch named {name!r}; known: {', '.join(self.names())}")

    def applied(self) -> Tuple[str, ...]:
        """The patches in effect, in registry order (whatever order they were applied in)."""
        return tuple(name for name in self.names() if name in self._applied)

    def _apply(self, patches: Sequence[Patch]) -> None:
        for patch in patches:
            if patch.name not in self._applied:
                patch.apply()
                self._applied.append(patch.name)

    def apply_cpu(self) -> Tuple[str, ...]:
        """Apply every patch once, only on a CPU-only setup. Returns the names in effect (the same
        tuple on every call; empty when CUDA is available)."""
        if self._cuda_available():
            return ()
        self._apply(self.patches)
        return self.applied()

    def apply_missing_te(self) -> Tuple[str, ...]:
        """Apply the not-CPU-only patches (missing Transformer Engine) when TE is absent, on any
        device. Returns the names of those in effect."""
        if self._te_available():
            return ()
        wanted = [p for p in self.patches if not p.cpu_only]
        self._apply(wanted)
        return tuple(p.name for p in wanted)

    def check_upstream(self) -> None:
        """Run every patch's upstream check (raises UpstreamChanged on the first mismatch)."""
        for patch in self.patches:
            patch.upstream_check()


# The process-wide registry: the megatron modules it patches are process-wide too.
REGISTRY = PatchRegistry(PATCHES)
