"""Adaptations of megatron-core 0.16.1 to a CPU-only torch build (gloo), and one named non-CPU gap.

megatron-core assumes CUDA in a handful of places that the GPT training path reaches:
``torch.cuda.current_device()`` used as a tensor device, ``device="cuda"`` literals, CUDA RNG
state in the tensor-parallel RNG tracker, CUDA streams in the MoE all-to-all dispatcher,
``torch.cuda.synchronize()`` around pipeline p2p, one ``Tensor.cuda()`` call, split sizes that the
alltoall dispatcher only converts to numpy for CUDA tensors, the router's expert-bias counter
that megatron hands to ``torch.compile`` (a C++ build per process on CPU), the uneven all-gather /
reduce-scatter it does over TP ranks (which gloo lacks), and two "no Transformer Engine / no Apex" gaps (an
unbound ``te_general_gemm`` and a torch norm wrapper that refuses sequence parallelism), and the
process groups its ``destroy_model_parallel`` leaves alive (each gloo group keeps a polling thread).

This package adapts exactly those sites and nothing else, one module per family:

=====================  ==============================================================
``torch_shim.py``      the CPU ``torch`` namespace a patched megatron module sees
``rng.py``             rng-state, rng-seed, rng-fork-warning
``moe.py``             moe-alltoall-splits, moe-expert-bias-compile
``sequence_parallel``  torch-norm-sequence-parallel, uneven-sequence-parallel-gloo
``device_sites.py``    cuda-device:<module> (a table), tied-embedding-cuda
``no_te.py``           moe-te-general-gemm: NOT about the CPU; needed wherever TE is missing
``process_groups.py``  reuse-process-groups (megatron's teardown leaves its groups alive)
``registry.py``        the one list, and when each patch applies
=====================  ==============================================================

Each :class:`Patch` has a name, a family, an idempotent ``apply`` and an ``upstream_check`` that
raises :class:`UpstreamChanged` when the upstream code it adapts changes form, so a megatron-core
upgrade makes ``tests/unit/test_compat.py`` fail. :func:`apply_cpu_patches` applies all of them
and does nothing when CUDA is available; :func:`apply_missing_te_patches` applies the no-TE ones on
any device without Transformer Engine.
"""

from __future__ import annotations

from typing import Tuple

from mod_train.compat.patch import Family, Patch, UpstreamChanged
from mod_train.compat.registry import PATCHES, REGISTRY, PatchRegistry

__all__ = [
    "Family",
    "PATCHES",
    "Patch",
    "PatchRegistry",
    "REGISTRY",
    "UpstreamChanged",
    "apply_cpu_patches",
    "apply_missing_te_patches",
    "applied_patches",
    "check_upstream",
]


def apply_cpu_patches() -> Tuple[str, ...]:
    """Every patch, once, on a CPU-only setup; nothing when CUDA is available."""
    return REGISTRY.apply_cpu()


def apply_missing_te_patches() -> Tuple[str, ...]:
    """The no-TE patches (e.g. the MoE router's unbound ``te_general_gemm``) on any device where
    Transformer Engine is not installed; nothing when it is."""
    return REGISTRY.apply_missing_te()


def applied_patches() -> Tuple[str, ...]:
    return REGISTRY.applied()


def check_upstream() -> None:
    REGISTRY.check_upstream()
