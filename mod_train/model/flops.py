"""The one count of training FLOPs per token (forward + backward = 3 x forward matmul FLOPs).

Conventions (Megatron-LM's, so MFU figures compare): a matmul of [m,k]x[k,n] costs 2mkn; attention
scores and the weighted sum cost 2 x 2 x s x h per token over the full (not causally halved)
sequence; norms, softmax and elementwise ops are not counted. A MoD layer counts only its routed
tokens (fraction c of the sequence, attending among c x s tokens) plus its router on every token;
an MoE layer counts top-k experts per token plus its router; a token sent to an integrated-MoDE
no-op expert costs nothing in the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from mod_train.config.schema import ModelConfig


@dataclass(frozen=True)
class LayerFlops:
    attention_linear: float  # QKV + output projection
    attention_scores: float  # QK^T and attention x V
    mlp: float
    router: float

    @property
    def total(self) -> float:
        return self.attention_linear + self.attention_scores + self.mlp + self.router


def _mlp_flops(hidden: int, ffn: int, swiglu: bool) -> float:
    return 2.0 * hidden * ffn * (3 if swiglu else 2)


def layer_forward_flops(model: ModelConfig, ffn_hidden_size: int, layer: int, mod_capacity: Dict[int, float],
                        moe_layers: List[int], noop_fraction: float = 0.0) -> LayerFlops:
    """Forward FLOPs per token of one layer, averaged over the tokens of a sequence."""
    h, s = model.hidden_size, model.seq_length
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    kv_dim = groups * (h // heads)
    swiglu = model.activation == "swiglu"
    attn_linear = 2.0 * h * (h + 2 * kv_dim) + 2.0 * h * h
    router = 0.0
    if layer in moe_layers and model.moe.num_experts > 0:
        moe = model.moe
        expert_ffn = moe.ffn_hidden_size or ffn_hidden_size
        experts = moe.num_experts + (1 if moe.mode == "integrated" else 0)
        # Integrated MoDE: the share of routing slots taken by the no-op expert does no MLP work.
        mlp = moe.top_k * (1.0 - noop_fraction) * _mlp_flops(h, expert_ffn, swiglu)
        if moe.shared_expert_ffn_hidden_size:
            mlp += _mlp_flops(h, moe.shared_expert_ffn_hidden_size, swiglu)
        router += 2.0 * h * experts
    else:
        mlp = _mlp_flops(h, ffn_hidden_size, swiglu)
    if layer in mod_capacity:
        c = round(mod_capacity[layer] * s) / s  # the capacity actually used: k / s
        mod_router = 2.0 * h
        if model.mod.causal == "predictor":
            ph = model.mod.predictor_hidden or max(h // 8, 1)
            mod_router += 2.0 * h * ph + 2.0 * ph
        return LayerFlops(attention_linear=c * attn_linear, attention_scores=c * 4.0 * (c * s) * h,
                          mlp=c * mlp, router=c * router + mod_router)
    return LayerFlops(attention_linear=attn_linear, attention_scores=4.0 * s * h, mlp=mlp, router=router)


def forward_flops_per_token(model: ModelConfig, ffn_hidden_size: int, vocab_size: int, mod_layers: List[int],
                            mod_capacities: List[float], moe_layers: List[int], noop_fraction: float = 0.0) -> float:
    caps = dict(zip(mod_layers, mod_capacities))
    layers = sum(layer_forward_flops(model, ffn_hidden_size, i, caps, moe_layers, noop_fraction).total
                 for i in range(model.num_layers))
    logits = 2.0 * model.hidden_size * vocab_size
    return layers + logits


def train_flops_per_token(model: ModelConfig, ffn_hidden_size: int, vocab_size: int, mod_layers: List[int],
                          mod_capacities: List[float], moe_layers: List[int], noop_fraction: float = 0.0) -> float:
    """Forward + backward (backward = 2 x forward)."""
    return 3.0 * forward_flops_per_token(model, ffn_hidden_size, vocab_size, mod_layers, mod_capacities,
                                         moe_layers, noop_fraction)


# Dense bf16 tensor-core peak (TFLOP/s) of known devices, for MFU when train.peak_tflops is unset.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops_for(device_name: str) -> float | None:
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return val
    return None
