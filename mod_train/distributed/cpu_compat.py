"""Run megatron-core's own code path on a CPU-only torch build (gloo backend).

megatron-core 0.16.1 assumes CUDA in a handful of places that the GPT training path reaches:
``torch.cuda.current_device()`` used as a tensor device, ``device="cuda"`` literals, CUDA RNG
state in the tensor-parallel RNG tracker, CUDA streams in the MoE all-to-all dispatcher,
``torch.cuda.synchronize()`` around pipeline p2p, one ``Tensor.cuda()`` call, split sizes that the
alltoall dispatcher only converts to numpy for CUDA tensors, the uneven all-gather / reduce-scatter
it does over TP ranks (which gloo lacks), and two "no Transformer Engine / no Apex" gaps (an unbound ``te_general_gemm`` and a torch norm wrapper that refuses sequence
parallelism).

This module adapts exactly those sites and nothing else. Each adaptation is a small named
:class:`Patch` in :data:`PATCHES` with

* ``apply``: the change, as narrow as possible. Most are "give one megatron module a ``torch``
  namespace whose ``cuda`` attribute means the CPU" (:data:`_CPU_TORCH`): the module's code is
  unchanged, only its global name ``torch`` is rebound, so nothing outside that module sees a
  different torch.
* ``upstream_check``: asserts that the upstream code under the patch still has the form the patch
  was written for (the attribute exists and its source still contains the CUDA call). A
  megatron-core upgrade that changes any of it makes ``tests/unit/test_cpu_compat.py`` fail.

:func:`apply_cpu_compat` applies all of them, is idempotent, and does nothing at all when CUDA is
available: on a GPU the code path is megatron-core's own, untouched.

Semantics on CPU: "the current CUDA device" is the CPU, "the CUDA default generator" is torch's
default CPU generator (so named tracker states such as ``'model-parallel-rng'`` are swapped in and
out of it by ``fork()``), and there is one stream (CPU ops run in program order).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import logging
import os
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

__all__ = [
    "Patch",
    "PATCHES",
    "UpstreamChanged",
    "apply_cpu_compat",
    "applied_patches",
    "check_upstream",
    "default_device",
]


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class UpstreamChanged(AssertionError):
    """The megatron-core code a patch adapts no longer looks the way the patch expects."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # the upstream object(s) adapted, human-readable
    apply: Callable[[], None]  # idempotent
    upstream_check: Callable[[], None]  # raises UpstreamChanged


# --------------------------------------------------------------------------------------------
# CPU stand-ins for the torch.cuda API megatron uses
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    # A bare int is a CUDA ordinal to torch (device=0 means cuda:0).
    return isinstance(device, int) and not isinstance(device, bool)


class _SerialEvent:
    """Event on the only CPU "stream": everything before it has already happened."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _SerialStream:
    """CPU ops run in program order, so there is exactly one stream: all instances are equal
    (the MoE alltoall dispatcher compares ``current_stream()`` with its side stream and would
    otherwise call ``Tensor.record_stream``, which CPU tensors do not have)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _SerialEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _SerialStream)

    def __hash__(self) -> int:
        return hash(_SerialStream)


class _CpuCudaNamespace(types.ModuleType):
    """What ``torch.cuda`` means inside a patched megatron module on a CPU-only build.

    Only the names megatron's training path calls are redefined; everything else is the real
    ``torch.cuda`` (so e.g. ``is_available()`` still says False).
    """

    Stream = _SerialStream
    Event = _SerialEvent

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda as seen by megatron modules on a CPU-only build")

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        pass  # CPU collectives (gloo) and kernels are synchronous

    @staticmethod
    def current_stream(device=None) -> _SerialStream:
        return _SerialStream()

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext(stream)

    # "The CUDA default generator" is torch's default CPU generator.
    @staticmethod
    def get_rng_state(device="cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


# Tensor factories whose ``device=`` may be a "cuda" literal in megatron (e.g. schedules.py
# ``torch.zeros([], dtype=torch.int, device="cuda")``, transformer/utils.py causal masks).
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like", "full_like",
)


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return factory


class _CpuTorchNamespace(types.ModuleType):
    """The ``torch`` global given to one patched megatron module: real torch, except that
    ``torch.cuda`` is :class:`_CpuCudaNamespace` and tensor factories map a CUDA ``device=`` to
    the CPU."""

    def __init__(self) -> None:
        super().__init__("torch", "torch as seen by megatron modules on a CPU-only build")
        self.cuda = _CpuCudaNamespace()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorchNamespace()


# --------------------------------------------------------------------------------------------
# Helpers for patches and upstream checks
# --------------------------------------------------------------------------------------------

_ORIGINALS: Dict[Tuple[str, str], object] = {}  # (owner qualname, attr) -> upstream object


def _mod(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def _key(owner, attr: str) -> Tuple[str, str]:
    if isinstance(owner, types.ModuleType):
        return owner.__name__, attr
    return f"{owner.__module__}.{owner.__qualname__}", attr


def _set(owner, attr: str, value) -> None:
    """Replace ``owner.attr``, remembering the upstream object once (idempotent)."""
    key = _key(owner, attr)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = owner.__dict__[attr] if attr in vars(owner) else getattr(owner, attr)
    setattr(owner, attr, value)


def _upstream(owner, attr: str):
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


def _require(where: str, source: str, *snippets: str) -> None:
    for snippet in snippets:
        if snippet not in source:
            raise UpstreamChanged(f"{where}: expected upstream code {snippet!r} is gone; "
                                  "re-check the cpu_compat patch for it")


def _require_module(module_name: str, *snippets: str) -> None:
    _require(module_name, inspect.getsource(_mod(module_name)), *snippets)


def _require_attr(owner, attr: str, *snippets: str) -> None:
    where = f"{getattr(owner, '__name__', owner)}.{attr}"
    _require(where, _source(_upstream(owner, attr)), *snippets)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------

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
    random = _mod(_RANDOM)
    _set(random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _set(random, "_set_cuda_rng_state", _cpu_set_rng_state)


def _check_rng_state() -> None:
    random = _mod(_RANDOM)
    _require_attr(random, "_get_cuda_rng_state", "torch.cuda.random.get_rng_state(device=device)")
    _require_attr(random, "_set_cuda_rng_state", "_lazy_call(cb)", "torch.cuda.default_generators")
    tracker = random.CudaRNGStatesTracker
    _require_attr(tracker, "fork", "_get_cuda_rng_state(", "_set_cuda_rng_state(self.states_[name]")
    _require_attr(random, "_get_all_rng_states", "_get_cuda_rng_state(")
    _require_attr(random, "_set_all_rng_states", "_set_cuda_rng_state(")
    _require_attr(tracker, "get_states", "self.states_")
    _require_attr(tracker, "set_states", "self.states_ = states")


# rng-seed: `CudaRNGStatesTracker.add` creates a named state with `torch.cuda.get_rng_state()` /
# `torch.cuda.manual_seed(seed)`, and `model_parallel_cuda_manual_seed` seeds the default state
# with `torch.cuda.manual_seed(data_parallel_seed)`. On a CPU-only build get_rng_state raises and
# manual_seed is a silent lazy no-op. The module's `torch` becomes _CPU_TORCH so both act on the
# default CPU generator; TP/EP-rank-dependent seeds (seed + 2718 + tp_rank, ...) stay as upstream.
# NB: so on CPU model_parallel_cuda_manual_seed(seed) also re-seeds the CPU generator with `seed`.
def _install_cpu_torch(module_name: str) -> None:
    module = _mod(module_name)
    if module.__dict__.get("torch") is not _CPU_TORCH:
        _set(module, "torch", _CPU_TORCH)


def _check_torch_global(module_name: str) -> None:
    if _upstream(_mod(module_name), "torch") is not torch:
        raise UpstreamChanged(f"{module_name}: its global `torch` is not the torch module")


def _check_rng_seed() -> None:
    random = _mod(_RANDOM)
    _check_torch_global(_RANDOM)
    _require_attr(random.CudaRNGStatesTracker, "add",
                  "torch.cuda.get_rng_state()", "torch.cuda.manual_seed(seed)",
                  "_set_cuda_rng_state(orig_rng_state)")
    _require_attr(random, "model_parallel_cuda_manual_seed",
                  "torch.cuda.manual_seed(data_parallel_seed)", "offset + tp_rank")


# rng-fork-warning: `CudaRNGStatesTracker.fork()` logs 'CPU RNG state changed within GPU RNG
# context' when the CPU generator moved inside the fork. On CPU the forked state *is* the CPU
# generator, so every dropout inside a fork would log it; drop exactly that record.
_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropForkCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _FORK_WARNING


def _apply_rng_fork_warning() -> None:
    logger = logging.getLogger(_RANDOM)
    if not any(isinstance(f, _DropForkCpuRngWarning) for f in logger.filters):
        logger.addFilter(_DropForkCpuRngWarning())


def _check_rng_fork_warning() -> None:
    random = _mod(_RANDOM)
    _require_module(_RANDOM, "logging.getLogger(__name__)")
    _require_attr(random.CudaRNGStatesTracker, "fork", f"'{_FORK_WARNING}'")


# moe-te-general-gemm: moe_utils.py binds `te_general_gemm` only inside
# `try: import transformer_engine ...`, but `RouterGatingLinearFunction.forward` always evaluates
# `te_general_gemm is not None` -> NameError in every MoE router without Transformer Engine.
# Bind it to None, which selects upstream's own torch.mm/addmm fallback.
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"


def _apply_moe_te_general_gemm() -> None:
    moe_utils = _mod(_MOE_UTILS)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _check_moe_te_general_gemm() -> None:
    moe_utils = _mod(_MOE_UTILS)
    _require_module(_MOE_UTILS, "        te_general_gemm,\n    )\n\n    HAVE_TE = True")
    _require_attr(moe_utils.RouterGatingLinearFunction, "forward",
                  "if te_general_gemm is not None", "torch.mm(inp.to(router_dtype)")


# moe-alltoall-splits: the alltoall dispatcher turns its split sizes into numpy with
# `maybe_move_tensor_to_cpu(self.input_splits, as_numpy=True, ...)` (token_dispatcher.py,
# `_maybe_dtoh_and_synchronize`), but upstream only converts tensors that are `is_cuda`. On CPU
# they stay tensors and `torch.distributed.all_to_all_single(output_split_sizes=<tensor>)` raises
# TypeError. Rebind the name in token_dispatcher only, converting CPU tensors the same way.
_TOKEN_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"


def _apply_moe_alltoall_splits() -> None:
    dispatcher = _mod(_TOKEN_DISPATCHER)
    upstream = _upstream(dispatcher, "maybe_move_tensor_to_cpu")
    if getattr(dispatcher.maybe_move_tensor_to_cpu, "_cpu_compat", False):
        return

    @functools.wraps(upstream)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._cpu_compat = True
    _set(dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


def _check_moe_alltoall_splits() -> None:
    dispatcher = _mod(_TOKEN_DISPATCHER)
    _require_attr(dispatcher, "maybe_move_tensor_to_cpu",
                  "def maybe_move_tensor_to_cpu(\n    tensor: torch.Tensor, as_numpy: bool = False, "
                  "record_stream: bool = False\n)",
                  "if torch.is_tensor(tensor) and tensor.is_cuda:", "cpu_tensor = cpu_tensor.numpy()")
    _require_attr(dispatcher.MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize",
                  "self.input_splits = maybe_move_tensor_to_cpu(\n"
                  "                        self.input_splits, as_numpy=True")
    _require_attr(dispatcher.MoEAlltoAllTokenDispatcher, "token_dispatch",
                  "self.ep_group, permutated_local_input_tokens, self.output_splits, self.input_splits")


# uneven-sequence-parallel-gloo: with TP > 1 the alltoall MoE dispatcher gathers and reduce-scatters
# a different number of tokens per TP rank (`gather_from_sequence_parallel_region(...,
# output_split_sizes=...)`), which megatron does with `all_gather` / `reduce_scatter` over lists of
# unequal tensors. NCCL supports that; gloo does not (unequal sizes are refused, reduce_scatter
# does not exist). For gloo groups only, the uneven case is done with the same result by padding to
# the largest split (gather) and by an all-reduce then this rank's slice (reduce-scatter); the
# even case and every other backend go to megatron's function unchanged.
_MAPPINGS = "megatron.core.tensor_parallel.mappings"


def _is_gloo(group) -> bool:
    import torch.distributed as dist

    return dist.get_backend(group) == "gloo"


def _apply_uneven_sp_gloo() -> None:
    import torch.distributed as dist

    mappings = _mod(_MAPPINGS)
    gather, reduce_scatter = _upstream(mappings, "_gather_along_first_dim"), \
        _upstream(mappings, "_reduce_scatter_along_first_dim")
    if getattr(mappings._gather_along_first_dim, "_cpu_compat", False):
        return

    @functools.wraps(gather)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.size(0)] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes)])

    @functools.wraps(reduce_scatter)
    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].clone()

    _gather_along_first_dim._cpu_compat = True
    _reduce_scatter_along_first_dim._cpu_compat = True
    _set(mappings, "_gather_along_first_dim", _gather_along_first_dim)
    _set(mappings, "_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim)


def _check_uneven_sp_gloo() -> None:
    mappings = _mod(_MAPPINGS)
    _require_attr(mappings, "_gather_along_first_dim",
                  "def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False)",
                  "torch.distributed.all_gather(output_tensor_list, input_, group=group)")
    _require_attr(mappings, "_reduce_scatter_along_first_dim",
                  "def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False)",
                  "torch.distributed.reduce_scatter(output, input_tensor_list, group=group)")
    _require_attr(mappings._GatherFromSequenceParallelRegion, "forward",
                  "_gather_along_first_dim(input_, group, output_split_sizes, use_global_buffer)")


# tied-embedding-cuda: `LanguageModule.setup_embeddings_and_output_layer` does
# `weight.data = weight.data.cuda()` before all-reducing the tied embedding between the first and
# last pipeline stage (PP > 1 with share_embeddings_and_output_weights). A Tensor method cannot be
# rebound per module, so for the duration of that one call only, `Tensor.cuda` returns the tensor
# itself (on a CPU-only build it could only raise). Restored on exit.
_LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real


def _apply_tied_embedding_cuda() -> None:
    cls = _mod(_LANGUAGE_MODULE).LanguageModule
    upstream = _upstream(cls, "setup_embeddings_and_output_layer")
    if getattr(cls.setup_embeddings_and_output_layer, "_cpu_compat", False):
        return

    @functools.wraps(upstream)
    def setup_embeddings_and_output_layer(self) -> None:
        with _tensor_cuda_is_identity():
            return upstream(self)

    setup_embeddings_and_output_layer._cpu_compat = True
    _set(cls, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)


def _check_tied_embedding_cuda() -> None:
    cls = _mod(_LANGUAGE_MODULE).LanguageModule
    _require_attr(cls, "setup_embeddings_and_output_layer",
                  "weight.data = weight.data.cuda()", "torch.distributed.all_reduce(weight.data")


# torch-norm-sequence-parallel: without Apex/TE the local spec's norm is `WrappedTorchNorm`
# (torch.nn.LayerNorm / RMSNorm), whose constructor asserts `not config.sequence_parallel`
# (FusedLayerNorm, the SP-capable local norm, needs Apex). With SP each TP rank normalises its own
# sequence shard with replicated weights, which is correct forward; the weight grads are partial
# and must be summed over the TP group. Megatron marks such params `sequence_parallel=True` (as
# FusedLayerNorm does) and its finalize_model_grads all-reduces them; do the same here.
_TORCH_NORM = "megatron.core.transformer.torch_norm"


def _apply_torch_norm_sp() -> None:
    cls = _mod(_TORCH_NORM).WrappedTorchNorm
    upstream_new = _upstream(cls, "__new__")
    if isinstance(upstream_new, staticmethod):
        upstream_new = upstream_new.__func__
    if getattr(cls.__new__, "_cpu_compat", False):
        return

    @functools.wraps(upstream_new)
    def __new__(cls_, config, *args, **kwargs):
        if not config.sequence_parallel:
            return upstream_new(cls_, config, *args, **kwargs)
        no_sp = copy.copy(config)
        object.__setattr__(no_sp, "sequence_parallel", False)
        norm = upstream_new(cls_, no_sp, *args, **kwargs)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", True)
        return norm

    __new__._cpu_compat = True
    _set(cls, "__new__", staticmethod(__new__))


def _check_torch_norm_sp() -> None:
    cls = _mod(_TORCH_NORM).WrappedTorchNorm
    _require_attr(cls, "__new__", "assert not config.sequence_parallel",
                  "return norm_cls(normalized_shape=hidden_size, eps=eps)")
    _require_module("megatron.core.distributed.finalize_model_grads",
                    'getattr(param, "sequence_parallel", False)')


# cuda-device:<module>: the module's code uses `torch.cuda.current_device()` as a device,
# `device="cuda"` literals, `torch.cuda.synchronize()` or CUDA streams on the training path.
# Rebind that module's global `torch` to _CPU_TORCH (see its docstring). Snippets = the upstream
# lines adapted; each must still be in the module.
_DEVICE_SITES: List[Tuple[str, Tuple[str, ...], str]] = [
    ("megatron.core.models.common.embeddings.rotary_pos_embedding",
     ("self.inv_freq = self.inv_freq.to(device=torch.cuda.current_device())",),
     "RotaryEmbedding.get_emb moves inv_freq to the current CUDA device"),
    ("megatron.core.utils",
     ("device=torch.cuda.current_device(),\n                    requires_grad=False",),
     "GlobalMemoryBuffer.get_tensor (parallel_state.get_global_memory_buffer(); SP all-gathers) "
     "allocates on the current CUDA device"),
    ("megatron.core.tensor_parallel.mappings",
     ("output = torch.empty(dim_size, dtype=input_.dtype, device=torch.cuda.current_device())",),
     "SP gather/reduce-scatter outputs allocated on the current CUDA device"),
    ("megatron.core.tensor_parallel.layers",
     ("dim_size, dtype=input.dtype, device=torch.cuda.current_device(), requires_grad=False",),
     "LinearWithGradAccumulationAndAsyncCommunication.backward (SP) all-gather buffer"),
    ("megatron.core.transformer.utils",
     ('torch.ones(sq, sq, device="cuda")',),
     "get_default_causal_mask: DotProductAttention's causal mask when no mask is passed"),
    ("megatron.core.pipeline_parallel.schedules",
     ('total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")',),
     "forward_backward_* token counter"),
    ("megatron.core.pipeline_parallel.p2p_communication",
     ("device=torch.cuda.current_device()", "torch.cuda.synchronize()"),
     "p2p receive buffers and the post-batch_isend_irecv synchronize"),
    ("megatron.core.transformer.moe.router",
     ("self.weight.data = self.weight.data.to(device=torch.cuda.current_device())",),
     "Router.gating moves its CPU-initialised weight to the current CUDA device"),
    ("megatron.core.transformer.moe.token_dispatcher",
     ("MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()",
      "with torch.cuda.stream(self.cuda_dtoh_stream):",
      "on_side_stream = torch.cuda.current_stream() != self.cuda_dtoh_stream"),
     "alltoall dispatcher: side stream for device-to-host copies of the split sizes"),
    ("megatron.core.transformer.moe.moe_utils",
     ('tracker[key]["values"] = torch.zeros(num_layers, device="cuda")',),
     "track_moe_metrics(force_initialize=True) allocates the aux-loss log tracker on CUDA"),
]


def _make_device_patch(module_name: str, snippets: Tuple[str, ...], what: str) -> Patch:
    def apply() -> None:
        _install_cpu_torch(module_name)

    def check() -> None:
        _check_torch_global(module_name)
        _require_module(module_name, *snippets)

    short = module_name.removeprefix("megatron.core.")
    return Patch(f"cuda-device:{short}", f"{module_name} ({what})", apply, check)


PATCHES: Tuple[Patch, ...] = (
    Patch("rng-state", f"{_RANDOM}._get_cuda_rng_state / _set_cuda_rng_state",
          _apply_rng_state, _check_rng_state),
    Patch("rng-seed", f"{_RANDOM}: CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed",
          functools.partial(_install_cpu_torch, _RANDOM), _check_rng_seed),
    Patch("rng-fork-warning", f"{_RANDOM}.CudaRNGStatesTracker.fork warning",
          _apply_rng_fork_warning, _check_rng_fork_warning),
    Patch("moe-te-general-gemm", f"{_MOE_UTILS}.te_general_gemm (unbound without TE)",
          _apply_moe_te_general_gemm, _check_moe_te_general_gemm),
    Patch("moe-alltoall-splits", f"{_TOKEN_DISPATCHER}.maybe_move_tensor_to_cpu",
          _apply_moe_alltoall_splits, _check_moe_alltoall_splits),
    Patch("tied-embedding-cuda", f"{_LANGUAGE_MODULE}.LanguageModule.setup_embeddings_and_output_layer",
          _apply_tied_embedding_cuda, _check_tied_embedding_cuda),
    Patch("torch-norm-sequence-parallel", f"{_TORCH_NORM}.WrappedTorchNorm.__new__",
          _apply_torch_norm_sp, _check_torch_norm_sp),
    Patch("uneven-sequence-parallel-gloo", f"{_MAPPINGS}._gather_along_first_dim / _reduce_scatter_along_first_dim",
          _apply_uneven_sp_gloo, _check_uneven_sp_gloo),
    *(_make_device_patch(*site) for site in _DEVICE_SITES),
)

_APPLIED: List[str] = []


def check_upstream() -> None:
    """Run every patch's upstream_check (raises :class:`UpstreamChanged` on the first mismatch)."""
    for patch in PATCHES:
        patch.upstream_check()


def applied_patches() -> Tuple[str, ...]:
    return tuple(_APPLIED)


def apply_cpu_compat() -> Tuple[str, ...]:
    """Apply every patch once, only on a CPU-only setup. Returns the names of the patches in
    effect (the same tuple on every call; empty when CUDA is available)."""
    if torch.cuda.is_available():
        return ()
    for patch in PATCHES:
        if patch.name not in _APPLIED:
            patch.apply()
            _APPLIED.append(patch.name)
    return tuple(_APPLIED)
