"""MoE family: the alltoall token dispatcher's CUDA-only handling of its split sizes."""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from mod_train.compat.patch import Family, Patch, is_marked, mark, module, require_attr, set_attr, upstream_attr

__all__ = ["PATCHES"]

_TOKEN_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"


# moe-alltoall-splits: the alltoall dispatcher turns its split sizes into numpy with
# `maybe_move_tensor_to_cpu(self.input_splits, as_numpy=True, ...)` (token_dispatcher.py,
# `_maybe_dtoh_and_synchronize`), but upstream only converts tensors that are `is_cuda`. On CPU
# they stay tensors and `torch.distributed.all_to_all_single(output_split_sizes=<tensor>)` raises
# TypeError. Rebind the name in token_dispatcher only, converting CPU tensors the same way.
def _apply_moe_alltoall_splits() -> None:
    dispatcher = module(_TOKEN_DISPATCHER)
    upstream = upstream_attr(dispatcher, "maybe_move_tensor_to_cpu")
    if is_marked(dispatcher.maybe_move_tensor_to_cpu):
        return

    @functools.wraps(upstream)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    set_attr(dispatcher, "maybe_move_tensor_to_cpu", mark(maybe_move_tensor_to_cpu))


def _check_moe_alltoall_splits() -> None:
    dispatcher = module(_TOKEN_DISPATCHER)
    require_attr(dispatcher, "maybe_move_tensor_to_cpu",
                 "def maybe_move_tensor_to_cpu(\n    tensor: torch.Tensor, as_numpy: bool = False, "
                 "record_stream: bool = False\n)",
                 "if torch.is_tensor(tensor) and tensor.is_cuda:", "cpu_tensor = cpu_tensor.numpy()")
    require_attr(dispatcher.MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize",
                 "self.input_splits = maybe_move_tensor_to_cpu(\n"
                 "                        self.input_splits, as_numpy=True")
    require_attr(dispatcher.MoEAlltoAllTokenDispatcher, "token_dispatch",
                 "self.ep_group, permutated_local_input_tokens, self.output_splits, self.input_splits")


PATCHES: Tuple[Patch, ...] = (
    Patch("moe-alltoall-splits", Family.moe, f"{_TOKEN_DISPATCHER}.maybe_move_tensor_to_cpu",
          _apply_moe_alltoall_splits, _check_moe_alltoall_splits),
)
