"""RNG family: megatron's tensor-parallel RNG tracker on the default CPU generator.

On CPU "the CUDA default generator" is torch's default CPU generator, so named tracker states
such as ``'model-parallel-rng'`` are independent CPU generator states that ``fork()`` swaps in and
back out.
"""

from __future__ import annotations

import functools
import logging
from typing import Tuple

import torch

from mod_train.compat.patch import Family, Patch, module, require_attr, require_module, set_attr
from mod_train.compat.torch_shim import check_torch_global, install_cpu_torch

__all__ = ["FORK_WARNING", "PATCHES", "DropForkCpuRngWarning"]

_RANDOM = "megatron.core.tensor_parallel.random"


# rng-state: tensor_parallel/random.py `_get_cuda_rng_state` returns
# `torch.cuda.random.get_rng_state(device)` and `_set_cuda_rng_state` installs a state through
# `_lazy_call(cb)` on `torch.cuda.default_generators[idx]`. On a CPU-only build the first raises
# and the second is *silently queued and never run*. They are the only state get/set used by
# `CudaRNGStatesTracker.fork()`, activation checkpointing and `_get/_set_all_rng_states`
# (checkpoint save/restore), so pointing them at the default CPU generator makes each named
# tracker state an independent CPU generator state that fork() swaps in and back out.
def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states have no CPU equivalent")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states have no CPU equivalent")
    torch.set_rng_state(new_state)


def _apply_rng_state() -> None:
    random = module(_RANDOM)
    set_attr(random, "_get_cuda_rng_state", _cpu_get_rng_state)
    set_attr(random, "_set_cuda_rng_state", _cpu_set_rng_state)


def _check_rng_state() -> None:
    random = module(_RANDOM)
    require_attr(random, "_get_cuda_rng_state", "torch.cuda.random.get_rng_state(device=device)")
    require_attr(random, "_set_cuda_rng_state", "_lazy_call(cb)", "torch.cuda.default_generators")
    tracker = random.CudaRNGStatesTracker
    require_attr(tracker, "fork", "_get_cuda_rng_state(", "_set_cuda_rng_state(self.states_[name]")
    require_attr(random, "_get_all_rng_states", "_get_cuda_rng_state(")
    require_attr(random, "_set_all_rng_states", "_set_cuda_rng_state(")
    require_attr(tracker, "get_states", "self.states_")
    require_attr(tracker, "set_states", "self.states_ = states")


# rng-seed: `CudaRNGStatesTracker.add` creates a named state with `torch.cuda.get_rng_state()` /
# `torch.cuda.manual_seed(seed)`, and `model_parallel_cuda_manual_seed` seeds the default state
# with `torch.cuda.manual_seed(data_parallel_seed)`. On a CPU-only build get_rng_state raises and
# manual_seed is a silent lazy no-op. The module's `torch` becomes CPU_TORCH so both act on the
# default CPU generator; TP/EP-rank-dependent seeds (seed + 2718 + tp_rank, ...) stay as upstream.
# NB: so on CPU model_parallel_cuda_manual_seed(seed) also re-seeds the CPU generator with `seed`.
def _check_rng_seed() -> None:
    random = module(_RANDOM)
    check_torch_global(_RANDOM)
    require_attr(random.CudaRNGStatesTracker, "add",
                 "torch.cuda.get_rng_state()", "torch.cuda.manual_seed(seed)",
                 "_set_cuda_rng_state(orig_rng_state)")
    require_attr(random, "model_parallel_cuda_manual_seed",
                 "torch.cuda.manual_seed(data_parallel_seed)", "offset + tp_rank")


# rng-fork-warning: `CudaRNGStatesTracker.fork()` logs 'CPU RNG state changed within GPU RNG
# context' when the CPU generator moved inside the fork. On CPU the forked state *is* the CPU
# generator, so every dropout inside a fork would log it; drop exactly that record.
FORK_WARNING = "CPU RNG state changed within GPU RNG context"


class DropForkCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != FORK_WARNING


def _apply_rng_fork_warning() -> None:
    logger = logging.getLogger(_RANDOM)
    if not any(isinstance(f, DropForkCpuRngWarning) for f in logger.filters):
        logger.addFilter(DropForkCpuRngWarning())


def _check_rng_fork_warning() -> None:
    random = module(_RANDOM)
    require_module(_RANDOM, "logging.getLogger(__name__)")
    require_attr(random.CudaRNGStatesTracker, "fork", f"'{FORK_WARNING}'")


PATCHES: Tuple[Patch, ...] = (
    Patch("rng-state", Family.rng, f"{_RANDOM}._get_cuda_rng_state / _set_cuda_rng_state",
          _apply_rng_state, _check_rng_state),
    Patch("rng-seed", Family.rng, f"{_RANDOM}: CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed",
          functools.partial(install_cpu_torch, _RANDOM), _check_rng_seed),
    Patch("rng-fork-warning", Family.rng, f"{_RANDOM}.CudaRNGStatesTracker.fork warning",
          _apply_rng_fork_warning, _check_rng_fork_warning),
)
