"""Device-site family: megatron code on the training path that names CUDA as the device.

Most sites are one table row (:data:`DEVICE_SITES`): the module's global ``torch`` becomes
:data:`mod_train.compat.torch_shim.CPU_TORCH`, and the row's snippets (the upstream lines adapted)
must still be in the module. ``Tensor.cuda()`` cannot be rebound per module, so the one site that
calls it (``tied-embedding-cuda``) is its own patch.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch

from mod_train.compat.patch import Family, Patch, is_marked, mark, module, require_attr, require_module, set_attr, \
    upstream_attr
from mod_train.compat.torch_shim import check_torch_global, install_cpu_torch

__all__ = ["DEVICE_SITES", "PATCHES", "TIED_EMBEDDING_PATCH"]

# (megatron module, upstream lines adapted, what they do on the training path)
DEVICE_SITES: Tuple[Tuple[str, Tuple[str, ...], str], ...] = (
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
     ("self.weight.data = self.weight.data.to(device=torch.cuda.current_device())",
      "'expert_bias',\n                torch.zeros(\n                    self.config.num_moe_experts,\n"
      "                    dtype=torch.float32,\n                    device=torch.cuda.current_device(),"),
     "Router.gating moves its CPU-initialised weight to the current CUDA device; TopKRouter allocates "
     "the expert-bias buffers (model.moe.load_balancing=expert_bias) there"),
    ("megatron.core.transformer.moe.token_dispatcher",
     ("MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()",
      "with torch.cuda.stream(self.cuda_dtoh_stream):",
      "on_side_stream = torch.cuda.current_stream() != self.cuda_dtoh_stream"),
     "alltoall dispatcher: side stream for device-to-host copies of the split sizes"),
    ("megatron.core.transformer.moe.moe_utils",
     ('tracker[key]["values"] = torch.zeros(num_layers, device="cuda")',),
     "track_moe_metrics(force_initialize=True) allocates the aux-loss log tracker on CUDA"),
    # checkpoint.async_save: megatron's background checkpoint writer.
    ("megatron.core.dist_checkpointing.strategies.async_utils",
     ("torch.cuda.synchronize()", "device=torch.cuda.current_device()"),
     "AsyncCallsQueue: synchronize before forking the writer, 'all ranks done' all-reduce on the device"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async",
     ("torch.cuda.synchronize()",),
     "FileSystemWriterAsync.preload_tensors: synchronize after the device-to-host copies"),
    ("megatron.core.dist_checkpointing.strategies.state_dict_saver",
     ("device=torch.cuda.current_device()",),
     "save_state_dict_async_finalize: the write-failure flag all-reduced on the device"),
)


def _site_patch(module_name: str, snippets: Tuple[str, ...], what: str) -> Patch:
    def check() -> None:
        check_torch_global(module_name)
        require_module(module_name, *snippets)

    short = module_name.removeprefix("megatron.core.")
    return Patch(f"cuda-device:{short}", Family.device_site, f"{module_name} ({what})",
                 functools.partial(install_cpu_torch, module_name), check)


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
    cls = module(_LANGUAGE_MODULE).LanguageModule
    upstream = upstream_attr(cls, "setup_embeddings_and_output_layer")
    if is_marked(cls.setup_embeddings_and_output_layer):
        return

    @functools.wraps(upstream)
    def setup_embeddings_and_output_layer(self) -> None:
        with _tensor_cuda_is_identity():
            return upstream(self)

    set_attr(cls, "setup_embeddings_and_output_layer", mark(setup_embeddings_and_output_layer))


def _check_tied_embedding_cuda() -> None:
    cls = module(_LANGUAGE_MODULE).LanguageModule
    require_attr(cls, "setup_embeddings_and_output_layer",
                 "weight.data = weight.data.cuda()", "torch.distributed.all_reduce(weight.data")


TIED_EMBEDDING_PATCH = Patch("tied-embedding-cuda", Family.device_site,
                             f"{_LANGUAGE_MODULE}.LanguageModule.setup_embeddings_and_output_layer",
                             _apply_tied_embedding_cuda, _check_tied_embedding_cuda)
PATCHES: Tuple[Patch, ...] = tuple(_site_patch(*site) for site in DEVICE_SITES)
