"""Tensor layouts between megatron-core (TP=1 GPTModel names) and the stock Hugging Face classes.

megatron's ``linear_qkv`` is grouped per query group: for each of the ``groups`` key/value heads,
its ``heads/groups`` query heads, then its key head, then its value head (rows of ``head_dim``;
``SelfAttention.get_query_key_value_tensors``). Llama keeps separate ``q_proj``/``k_proj``/``v_proj``
with heads in order. megatron's SwiGLU ``linear_fc1`` stacks [gate; up] (the first half goes
through the activation), Llama has ``gate_proj`` and ``up_proj``; Mixtral's fused
``gate_up_proj`` stacks them the same way as megatron.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

Tensor = torch.Tensor


def split_qkv(w: Tensor, heads: int, groups: int, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """megatron's grouped linear_qkv [(heads + 2 groups) d, h] -> q [heads d, h], k, v [groups d, h]."""
    per = heads // groups
    g = w.reshape(groups, per + 2, head_dim, w.size(-1))
    q = g[:, :per].reshape(heads * head_dim, -1)
    k = g[:, per].reshape(groups * head_dim, -1)
    v = g[:, per + 1].reshape(groups * head_dim, -1)
    return q.clone(), k.clone(), v.clone()


def join_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int, head_dim: int) -> Tensor:
    """The inverse of :func:`split_qkv`."""
    per = heads // groups
    h = q.size(-1)
    parts = [q.reshape(groups, per, head_dim, h), k.reshape(groups, 1, head_dim, h), v.reshape(groups, 1, head_dim, h)]
    return torch.cat(parts, dim=1).reshape((heads + 2 * groups) * head_dim, h).clone()


def _attention_and_norms(src: Dict[str, Tensor], i: int, heads: int, groups: int, d: int) -> Dict[str, Tensor]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    q, k, v = split_qkv(src[m + "self_attention.linear_qkv.weight"], heads, groups, d)
    return {
        h + "input_layernorm.weight": src[m + "input_layernorm.weight"],
        h + "self_attn.q_proj.weight": q,
        h + "self_attn.k_proj.weight": k,
        h + "self_attn.v_proj.weight": v,
        h + "self_attn.o_proj.weight": src[m + "self_attention.linear_proj.weight"],
        h + "post_attention_layernorm.weight": src[m + "pre_mlp_layernorm.weight"],
    }


def _ends(src: Dict[str, Tensor], tied: bool) -> Dict[str, Tensor]:
    out = {"model.embed_tokens.weight": src["embedding.word_embeddings.weight"],
           "model.norm.weight": src["decoder.final_layernorm.weight"]}
    if not tied:
        out["lm_head.weight"] = src["output_layer.weight"]
    return out


def megatron_to_llama(src: Dict[str, Tensor], layers: int, heads: int, groups: int, d: int,
                      tied: bool) -> Dict[str, Tensor]:
    out = _ends(src, tied)
    for i in range(layers):
        out.update(_attention_and_norms(src, i, heads, groups, d))
        fc1 = src[f"decoder.layers.{i}.mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2, dim=0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate.clone()
        out[f"model.layers.{i}.mlp.up_proj.weight"] = up.clone()
        out[f"model.layers.{i}.mlp.down_proj.weight"] = src[f"decoder.layers.{i}.mlp.linear_fc2.weight"]
    return out


def megatron_to_mixtral(src: Dict[str, Tensor], layers: int, heads: int, groups: int, d: int, tied: bool,
                        experts: int) -> Dict[str, Tensor]:
    """transformers >= 5 Mixtral: fused ``experts.gate_up_proj`` [E, 2 ffn, h] and ``experts.down_proj``."""
    out = _ends(src, tied)
    for i in range(layers):
        out.update(_attention_and_norms(src, i, heads, groups, d))
        m = f"decoder.layers.{i}.mlp."
        out[f"model.layers.{i}.mlp.gate.weight"] = src[m + "router.weight"]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [src[f"{m}experts.local_experts.{e}.linear_fc1.weight"] for e in range(experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [src[f"{m}experts.local_experts.{e}.linear_fc2.weight"] for e in range(experts)])
    return out


def llama_to_megatron(src: Dict[str, Tensor], layers: int, heads: int, groups: int, d: int,
                      tied: bool) -> Dict[str, Tensor]:
    """The inverse of :func:`megatron_to_llama` (a tied model has no ``output_layer.weight``)."""
    out = {"embedding.word_embeddings.weight": src["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": src["model.norm.weight"]}
    if not tied:
        out["output_layer.weight"] = src["lm_head.weight"]
    for i in range(layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = src[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = join_qkv(
            src[h + "self_attn.q_proj.weight"], src[h + "self_attn.k_proj.weight"], src[h + "self_attn.v_proj.weight"],
            heads, groups, d)
        out[m + "self_attention.linear_proj.weight"] = src[h + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = src[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([src[h + "mlp.gate_proj.weight"], src[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = src[h + "mlp.down_proj.weight"]
    return out
