"""Sequence-parallel family: SP collectives gloo lacks, and the torch norm that refuses SP.

``torch-norm-sequence-parallel`` covers a gap that exists without Apex/Transformer Engine on any
device; it is applied on CPU only (a GPU run is expected to have TE or Apex, see docs/gpu.md).
"""

from __future__ import annotations

import copy
import functools
from typing import Tuple

import torch

from mod_train.compat.patch import (
    Family, Patch, is_marked, mark, module, require_attr, require_module, set_attr, upstream_attr,
)

__all__ = ["PATCHES"]

_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_TORCH_NORM = "megatron.core.transformer.torch_norm"


# uneven-sequence-parallel-gloo: with TP > 1 the alltoall MoE dispatcher gathers and reduce-scatters
# a different number of tokens per TP rank (`gather_from_sequence_parallel_region(...,
# output_split_sizes=...)`), which megatron does with `all_gather` / `reduce_scatter` over lists of
# unequal tensors. NCCL supports that; gloo does not (unequal sizes are refused, reduce_scatter
# does not exist). For gloo groups only, the uneven case is done with the same result by padding to
# the largest split (gather) and by an all-reduce then this rank's slice (reduce-scatter); the
# even case and every other backend go to megatron's function unchanged.
def _is_gloo(group) -> bool:
    import torch.distributed as dist

    return dist.get_backend(group) == "gloo"


def _apply_uneven_sp_gloo() -> None:
    import torch.distributed as dist

    mappings = module(_MAPPINGS)
    gather, reduce_scatter = upstream_attr(mappings, "_gather_along_first_dim"), \
        upstream_attr(mappings, "_reduce_scatter_along_first_dim")
    if is_marked(mappings._gather_along_first_dim):
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

    set_attr(mappings, "_gather_along_first_dim", mark(_gather_along_first_dim))
    set_attr(mappings, "_reduce_scatter_along_first_dim", mark(_reduce_scatter_along_first_dim))


def _check_uneven_sp_gloo() -> None:
    mappings = module(_MAPPINGS)
    require_attr(mappings, "_gather_along_first_dim",
                 "def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False)",
                 "torch.distributed.all_gather(output_tensor_list, input_, group=group)")
    require_attr(mappings, "_reduce_scatter_along_first_dim",
                 "def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False)",
                 "torch.distributed.reduce_scatter(output, input_tensor_list, group=group)")
    require_attr(mappings._GatherFromSequenceParallelRegion, "forward",
                 "_gather_along_first_dim(input_, group, output_split_sizes, use_global_buffer)")


# torch-norm-sequence-parallel: without Apex/TE the local spec's norm is `WrappedTorchNorm`
# (torch.nn.LayerNorm / RMSNorm), whose constructor asserts `not config.sequence_parallel`
# (FusedLayerNorm, the SP-capable local norm, needs Apex). With SP each TP rank normalises its own
# sequence shard with replicated weights, which is correct forward; the weight grads are partial
# and must be summed over the TP group. Megatron marks such params `sequence_parallel=True` (as
# FusedLayerNorm does) and its finalize_model_grads all-reduces them; do the same here.
def _apply_torch_norm_sp() -> None:
    cls = module(_TORCH_NORM).WrappedTorchNorm
    upstream_new = upstream_attr(cls, "__new__")
    if isinstance(upstream_new, staticmethod):
        upstream_new = upstream_new.__func__
    if is_marked(cls.__new__):
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

    set_attr(cls, "__new__", staticmethod(mark(__new__)))


def _check_torch_norm_sp() -> None:
    cls = module(_TORCH_NORM).WrappedTorchNorm
    require_attr(cls, "__new__", "assert not config.sequence_parallel",
                 "return norm_cls(normalized_shape=hidden_size, eps=eps)")
    require_module("megatron.core.distributed.finalize_model_grads",
                   'getattr(param, "sequence_parallel", False)')


# Order kept from the single-file original: the norm before the gloo collectives.
TORCH_NORM_PATCH = Patch("torch-norm-sequence-parallel", Family.sequence_parallel,
                         f"{_TORCH_NORM}.WrappedTorchNorm.__new__", _apply_torch_norm_sp, _check_torch_norm_sp)
UNEVEN_GLOO_PATCH = Patch("uneven-sequence-parallel-gloo", Family.sequence_parallel,
                          f"{_MAPPINGS}._gather_along_first_dim / _reduce_scatter_along_first_dim",
                          _apply_uneven_sp_gloo, _check_uneven_sp_gloo)
PATCHES: Tuple[Patch, ...] = (TORCH_NORM_PATCH, UNEVEN_GLOO_PATCH)
