"""Which megatron-core layer spec each transformer layer gets: dense, MoD, MoE or MoDE.

This is the one place that decides per-layer structure. MoD layers are a spec whose module
wraps megatron-core's TransformerLayer (see ``mod.py``); MoE layers swap the MLP submodule for
megatron-core's MoELayer. Nothing here forks megatron-core.
"""

from __future__ import annotations

import copy
from typing import List

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mod_train.config.schema import ModelConfig
from mod_train.config.validate import Derived
from mod_train.model.attention import SDPAttention


def _use_transformer_engine() -> bool:
    """Transformer Engine kernels on GPU when installed; megatron-core's local modules otherwise."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def base_layer_spec(model: ModelConfig, moe: bool, mod_seq_length: int | None = None,
                    document_mask: bool = False) -> ModuleSpec:
    """The dense (or MoE) transformer layer spec from megatron-core.

    MoE layers use moe.py's observed layer/router and EP-independent experts (mode.py's no-op
    expert router for integrated MoDE); ``mod_seq_length`` marks the MoE layer of a MoD layer.
    ``document_mask``: batches carry a per-sample attention mask (``data.reset_attention_mask``).
    """
    num_experts = model.moe.num_experts if moe else None
    if _use_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        from mod_train.model.expert_mlp import choose_expert_mlp

        # Grouped GEMM experts (TEGroupedMLP) exist only with TE, i.e. only in this branch.
        grouped = moe and choose_expert_mlp(model.moe.grouped_gemm).grouped
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=grouped)
    else:
        spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, normalization=model.normalization))
        # megatron-core's local attention materialises masks with CUDA-only helpers; SDPA is both
        # portable and the fast kernel (see attention.py).
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if document_mask and spec.submodules.self_attention.submodules.core_attention is not SDPAttention:
        # TE's attention is built with the causal mask type, under which it ignores a given mask
        # (its document masking takes packed THD sequences, which MoD's gathered tokens are not):
        # SDPA applies the per-sample mask; TE's linears and norms stay.
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if moe:
        from mod_train.model.moe import moe_mlp_spec

        if model.moe.mode == "integrated":
            from mod_train.model.flops import noop_columns
            from mod_train.model.mode import MoDELayer, NoOpRouter

            mlp = moe_mlp_spec(spec.submodules.mlp, MoDELayer, NoOpRouter, mod_seq_length=mod_seq_length)
            mlp.params = {**(mlp.params or {}), "num_noop_experts": noop_columns(model)}
        else:
            mlp = moe_mlp_spec(spec.submodules.mlp, mod_seq_length=mod_seq_length)
        spec = copy.copy(spec)
        spec.submodules = copy.copy(spec.submodules)
        spec.submodules.mlp = mlp
    return spec


def final_layer_norm(model: ModelConfig):
    if _use_transformer_engine():
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider().layer_norm(rms_norm=model.normalization == "RMSNorm", for_qk=False)


def layer_specs(model: ModelConfig, derived: Derived, document_mask: bool = False) -> List[ModuleSpec]:
    """One spec per global layer index 0..num_layers-1."""
    specs: List[ModuleSpec] = []
    mod_capacity = dict(zip(derived.mod_layers, derived.mod_capacities))
    for idx in range(model.num_layers):
        spec = base_layer_spec(model, moe=idx in derived.moe_layers,
                               mod_seq_length=model.seq_length if idx in mod_capacity else None,
                               document_mask=document_mask)
        if idx in mod_capacity:
            # Mixture-of-Depths: the layer's block only sees the top-k tokens (mod.py).
            from mod_train.model.mod import mod_layer_spec

            spec = mod_layer_spec(spec, capacity=mod_capacity[idx], mod=model.mod, seq_length=model.seq_length,
                                  aux_loss_scale=1.0 / derived.num_microbatches)
        specs.append(spec)
    return specs


def decoder_block_spec(
    model: ModelConfig, derived: Derived, config: TransformerConfig, vp_stage: int | None = None,
    document_mask: bool = False,
) -> TransformerBlockSubmodules:
    """The specs of the layers that live on this pipeline stage (and virtual stage)."""
    specs = layer_specs(model, derived, document_mask)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer_norm = final_layer_norm(model)
    return TransformerBlockSubmodules(layer_specs=specs[offset: offset + count], layer_norm=layer_norm)
