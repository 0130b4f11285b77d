"""MoE family: the alltoall token dispatcher's CUDA-only handling of its split sizes, and the expert-bias
counter that megatron hands to torch.compile (20-40 s of C++
compilation per launch on CPU)."""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from mod_train.compat.patch import Family, Patch, UpstreamChanged, is_marked, mark, module, require_attr, \
    set_attr, upstream_attr

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


# moe-expert-bias-compile: TopKRouter._apply_expert_bias (model.moe.load_balancing=expert_bias; one
# in-place add of the routing counts) is decorated with megatron's `jit_fuser`, which is
# `torch.compile` on torch >= 2.2. On a CPU-only setup inductor generates and compiles C++ for it
# on the first training forward of every process: 20-40 s per launch on 2 cores, for an op that
# takes microseconds eagerly. Bind the function torch.compile wrapped (the same code, eager).
_ROUTER = "megatron.core.transformer.moe.router"


def _apply_moe_expert_bias_compile() -> None:
    router = module(_ROUTER).TopKRouter
    compiled = upstream_attr(router, "_apply_expert_bias")
    eager = getattr(compiled, "_torchdynamo_orig_callable", None)
    if eager is not None and router._apply_expert_bias is compiled:
        set_attr(router, "_apply_expert_bias", eager)


def _check_moe_expert_bias_compile() -> None:
    router = module(_ROUTER).TopKRouter
    require_attr(router, "_apply_expert_bias", "@jit_fuser", "self.local_tokens_per_expert += routing_map.sum(dim=0)")
    if not hasattr(upstream_attr(router, "_apply_expert_bias"), "_torchdynamo_orig_callable"):
        raise UpstreamChanged(f"{_ROUTER}.TopKRouter._apply_expert_bias is no longer a torch.compile'd function; "
                              "re-check the mod_train.compat patch moe-expert-bias-compile")


PATCHES: Tuple[Patch, ...] = (
    Patch("moe-alltoall-splits", Family.moe, f"{_TOKEN_DISPATCHER}.maybe_move_tensor_to_cpu",
          _apply_moe_alltoall_splits, _check_moe_alltoall_splits),
    Patch("moe-expert-bias-compile", Family.moe, f"{_ROUTER}.TopKRouter._apply_expert_bias (torch.compile'd)",
          _apply_moe_expert_bias_compile, _check_moe_expert_bias_compile),
)
