"""The one count of training FLOPs per token: Megatron-LM's, extended to MoD and MoDE.

Dense and MoE models are counted exactly as Megatron-LM counts them (``num_floating_point_operations``
in ``megatron/training/training.py``, the ``transformer_flops`` branch, Megatron-LM core_v0.16.1),
so the same model config gives the same number to the digit and MFU figures compare with Megatron's.
Per token (Megatron's total divided by batch x seq_length), with q = kv_channels x heads (= h here),
kv = kv_channels x query groups, f the MLP width, f_e the expert width, f_sh the shared-expert
width, g = 3 for SwiGLU (h->2f and f->h GEMMs) else 2, V the padded vocabulary:

    3 x 2 x [ sum over layers of ( h (q + 2 kv) + q h          QKV and output projections
                                  + q x s/2 x 2                 QK^T and (QK^T)V, causal: half the mask
                                  + g h f                       dense MLP, or for an MoE layer
                                  | g h (top_k f_e + f_sh) )    top_k routed experts + shared expert
              + h V ]                                           logits

``3``: every GEMM runs three times (forward, weight gradient, data gradient); ``2``: a GEMM
[m,k]x[k,n] is 2mkn FLOPs. Not counted (Megatron's convention): norms, softmax, activations,
rotary embeddings, the embedding lookup and the MoE router (an h x E GEMM). Megatron pads the
vocabulary to a multiple of ``make_vocab_size_divisible_by x TP``; mod-train pads independently of
TP (see ``config/validate.pad_vocab``), so at TP=1 the two agree and at TP>1 V is mod-train's.

Mixture-of-Depths, derived the same way. A MoD layer with capacity c routes k = round(c s) (at
least 1) of the s tokens of a sequence through its block; the others take the residual path. Per
token of the sequence (so times k/s for the routed ones):

    router   on all s tokens:  h x 1 GEMM            -> 2h        (+ predictor h->p->1: 2hp + 2p)
    block    on k tokens:      projections, MLP (or MoE) as above, times k/s
    attention among the k routed tokens, causally: each of the k attends on average to k/2 of
             them, so q x k/2 x 2 per routed token    -> (k/s) x q x k   (Megatron's q x s/2 x 2 at k=s)

all times 3 x 2 as above. At c = 1 a MoD layer costs the dense layer plus its router. The router is
negligible (2h of ~24h^2 per layer), but it is the one thing a MoD layer adds on every token, so it
is counted; MoE routers are not, to stay equal to Megatron.

MoDE. Staged: a MoD layer whose block has an MoE MLP (routed-token share times the MoE layer).
Integrated: the MoE router has n no-op columns besides its E experts; a routing slot on a no-op
column is dropped before dispatch and does no MLP work, so an integrated-MoDE layer runs
top_k x (1 - noop_fraction) experts per token, where ``noop_fraction`` is the share of routing
slots on no-op columns. That share is measured during training (``mode.py`` counts the slots of
every training forward pass); the trainer charges each logged interval of steps at the share
measured over exactly those steps, and a planned count (the isoFLOP budget) has to assume one
(:func:`balanced_noop_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from mod_train.config.schema import ModelConfig

# Megatron's expansion factors: forward + weight-gradient + data-gradient GEMMs; 2 FLOPs per FMA.
FORWARD_BACKWARD = 3
FMA = 2


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per token of one layer (averaged over the tokens of a sequence)."""

    attention_linear: float  # QKV + output projection
    attention_scores: float  # QK^T and attention x V, causal
    mlp: float  # dense MLP, or routed + shared experts
    router: float  # MoD router (+ predictor); MoE routers are not counted (Megatron)

    @property
    def total(self) -> float:
        return self.attention_linear + self.attention_scores + self.mlp + self.router


def routed_tokens(capacity: float, seq_length: int) -> int:
    """k: the tokens of a sequence a MoD layer of this capacity routes through its block."""
    return max(1, round(capacity * seq_length))


def _mlp_gemm_width(hidden: int, width: int, swiglu: bool) -> float:
    """FMAs per token of an MLP: h->f (h->2f with SwiGLU) and f->h."""
    return hidden * width * (3 if swiglu else 2)


def layer_forward_flops(model: ModelConfig, ffn_hidden_size: int, layer: int, mod_capacity: Dict[int, float],
                        moe_layers: List[int], noop_fraction: float = 0.0) -> LayerFlops:
    """Forward FLOPs per token of layer ``layer`` (0-based); see the module docstring."""
    h, s = model.hidden_size, model.seq_length
    heads = model.num_attention_heads
    kv_channels = h // heads
    q = kv_channels * heads
    kv = kv_channels * (model.num_query_groups or heads)
    swiglu = model.activation == "swiglu"
    attn_linear = FMA * (h * (q + 2 * kv) + q * h)
    if layer in moe_layers and model.moe.num_experts > 0:
        moe = model.moe
        experts_per_token = moe.top_k * (1.0 - noop_fraction) if moe.mode == "integrated" else moe.top_k
        mlp = FMA * _mlp_gemm_width(h, moe.ffn_hidden_size or ffn_hidden_size, swiglu) * experts_per_token
        mlp += FMA * _mlp_gemm_width(h, moe.shared_expert_ffn_hidden_size or 0, swiglu)
    else:
        mlp = FMA * _mlp_gemm_width(h, ffn_hidden_size, swiglu)
    if layer not in mod_capacity:
        return LayerFlops(attention_linear=attn_linear, attention_scores=FMA * q * s / 2 * 2, mlp=mlp, router=0.0)
    k = routed_tokens(mod_capacity[layer], s)
    share = k / s
    router = FMA * h
    if model.mod.causal == "predictor":
        ph = model.mod.predictor_hidden or max(h // 8, 1)
        router += FMA * (h * ph + ph)
    return LayerFlops(attention_linear=share * attn_linear, attention_scores=share * FMA * q * k / 2 * 2,
                      mlp=share * mlp, router=router)


def forward_flops_per_token(model: ModelConfig, ffn_hidden_size: int, vocab_size: int, mod_layers: List[int],
                            mod_capacities: List[float], moe_layers: List[int], noop_fraction: float = 0.0) -> float:
    """Forward FLOPs per token; ``vocab_size`` is the padded vocabulary (the logits GEMM)."""
    caps = dict(zip(mod_layers, mod_capacities))
    layers = sum(layer_forward_flops(model, ffn_hidden_size, i, caps, moe_layers, noop_fraction).total
                 for i in range(model.num_layers))
    return layers + FMA * model.hidden_size * vocab_size


def train_flops_per_token(model: ModelConfig, ffn_hidden_size: int, vocab_size: int, mod_layers: List[int],
                          mod_capacities: List[float], moe_layers: List[int], noop_fraction: float = 0.0) -> float:
    """Forward + backward: 3 x the forward GEMMs (Megatron-LM's ``num_floating_point_operations``
    per token for dense and MoE models; integrated MoDE at ``noop_fraction`` of its routing slots
    on no-op columns)."""
    return FORWARD_BACKWARD * forward_flops_per_token(model, ffn_hidden_size, vocab_size, mod_layers, mod_capacities,
                                                      moe_layers, noop_fraction)


def balanced_noop_fraction(model: ModelConfig) -> float:
    """The no-op share of integrated MoDE when its load-balancing loss is met exactly: every one of
    the E + n router columns gets 1 / (E + n) of the slots. A prior for planning (the isoFLOP
    budget), not a measurement; 0 for any other model."""
    moe = model.moe
    if moe.mode != "integrated" or moe.num_experts == 0:
        return 0.0
    n = noop_columns(model)
    return n / (moe.num_experts + n)


def noop_columns(model: ModelConfig) -> int:
    """Router columns of integrated MoDE's no-op experts (``model.moe.num_noop_experts``, default
    top_k, so that a token can skip its MLP entirely); 0 for any other model."""
    moe = model.moe
    if moe.mode != "integrated" or moe.num_experts == 0:
        return 0
    return moe.num_noop_experts if moe.num_noop_experts is not None else moe.top_k


# Dense bf16 tensor-core peak (TFLOP/s) of known devices, for MFU when train.peak_tflops is unset.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops_for(device_name: str) -> float | None:
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return val
    return None
