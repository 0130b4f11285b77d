"""Core attention over ``torch.nn.functional.scaled_dot_product_attention``.

Swapped in for megatron-core's ``DotProductAttention`` through the layer spec (``core_attention``)
when Transformer Engine is absent. SDPA picks flash / memory-efficient kernels on GPU and a fused
CPU kernel otherwise, never materialises the [s, s] mask for causal attention, and needs none of
megatron's CUDA-only buffers. Inside a MoD layer it runs over the gathered top-k tokens, which are
kept in sequence order, so plain causal masking is exactly "attend to earlier routed tokens".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Same constructor and forward contract as megatron-core's DotProductAttention."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use Transformer Engine.")
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        tp = get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias.")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.heads != self.groups:
            rep = self.heads // self.groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            # megatron masks mark positions to drop with True; SDPA's boolean mask marks positions to keep.
            mask = ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and q.size(2) > 1, scale=self.softmax_scale,
        )
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), self.heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters
