"""Token-by-token decoding over a megatron-core GPTModel with per-layer KV caches and causal MoD routing.

Top-k routing looks at the whole sequence, so it cannot be used while sampling. Each MoD layer
instead routes every new token by its own causal decision (``router.causal_decision``: the router's
logit or the predictor MLP's, trained towards top-k membership, above the layer's threshold calibrated
during training so that the routed share matches the capacity):

* a routed token runs the layer's block (attention over the earlier tokens routed to this layer,
  rotary embedding at its absolute position, then the MLP), its output is weighted exactly as
  ``MoDTransformerLayer.combine`` does, and its K/V are appended to this layer's cache;
* a token routed around the layer passes through unchanged and adds nothing to this layer's cache.

This is the same computation as a full-sequence forward with every MoD layer on causal routing
(``mod.causal_routing``); :func:`full_forward_logits` runs that reference and the tests check that
both give the same logits.

The decoder runs over the megatron-core modules themselves (embedding, each layer's
``input_layernorm``, ``self_attention.get_query_key_value_tensors`` (megatron's grouped QKV layout),
``linear_proj``, ``self_attn_bda``, ``pre_mlp_layernorm``, ``mlp`` (dense or MoE), ``mlp_bda``, the
final layernorm and ``output_layer``); only the attention over the KV cache is written here.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from mod_train.inference.errors import InferenceError
from mod_train.inference.kv_cache import LayerKVCache
from mod_train.model.unwrap import MultipleChunksError, unwrap_model


def model_of(model) -> torch.nn.Module:
    """The GPTModel inside a ModelChunks / DeepSpeed engine / list of chunks (InferenceError if several)."""
    try:
        return unwrap_model(model)
    except MultipleChunksError as e:
        raise InferenceError(f"generation: {e}") from e


def check_decodable(model) -> None:
    """The decoder handles one whole TP1/PP1 model with standard attention (InferenceError otherwise)."""
    cfg = model.config
    if not (model.pre_process and model.post_process):
        raise InferenceError("generation needs the whole model in one chunk (pipeline-parallel size 1)")
    if cfg.tensor_model_parallel_size != 1 or cfg.pipeline_model_parallel_size != 1:
        raise InferenceError(f"generation supports tensor/pipeline-parallel size 1 only, the model has "
                             f"tp={cfg.tensor_model_parallel_size} pp={cfg.pipeline_model_parallel_size}")
    if getattr(cfg, "multi_latent_attention", False):
        raise InferenceError("multi-latent attention is not supported by the KV-cache decoder")


def mlp_half(layer, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of a megatron ``TransformerLayer`` in eval mode, from its public submodules:
    ``pre_mlp_layernorm`` -> ``mlp`` (dense or MoE) -> ``mlp_bda`` (residual add, no dropout).

    megatron computes the same in its private ``TransformerLayer._forward_mlp``, which adds only
    training/GPU options the decoder never runs with (activation recompute, CPU offload, MLP
    chunking for prefill, CUDA graphs, the fused TP inference kernel). Upstream check: the KV-cache
    tests compare this path with megatron's own full forward (tests/unit/test_inference.py), so a
    megatron release that changes the MLP half fails them.
    """
    residual = x
    mlp_output_with_bias = layer.mlp(layer.pre_mlp_layernorm(x))
    return layer.mlp_bda(False, layer.config.bias_dropout_fusion)(mlp_output_with_bias, residual,
                                                                  layer.hidden_dropout)


class KVCacheDecoder:
    """Token-by-token inference over a megatron GPTModel (TP=PP=1) with per-layer KV caches, for a
    batch of sequences that advance together (one position per step, the same for all).

    ``step(tokens)`` consumes the next token of each sequence (at absolute position ``self.pos``)
    and returns the logits [batch, padded_vocab] predicting the token after it; given one int
    (batch 1) it returns [padded_vocab]. In a MoD layer each sequence's token is routed by its own
    causal decision: the routed ones run the block together, the others pass through.
    """

    def __init__(self, model, batch_size: int = 1) -> None:
        from mod_train.model.mod import MoDTransformerLayer

        self.model = model_of(model)
        check_decodable(self.model)
        self.config = self.model.config
        self.batch_size = batch_size
        self.layers = list(self.model.decoder.layers)
        self.caches = [LayerKVCache(batch_size) for _ in self.layers]
        self.is_mod = [isinstance(layer, MoDTransformerLayer) for layer in self.layers]
        # decisions[i][b]: one bool per consumed token of sequence b for MoD layer i (None: dense layer).
        self.decisions: List[Optional[List[List[bool]]]] = [
            [[] for _ in range(batch_size)] if m else None for m in self.is_mod]
        self.pos = 0
        self.device = next(self.model.parameters()).device
        self._all_rows = torch.arange(batch_size)
        self._rope: Optional[torch.Tensor] = None
        self.model.eval()

    # -------------------------------------------------------------- pieces
    def _rope_at(self, pos: int) -> Optional[torch.Tensor]:
        """The model's rotary table row for absolute position ``pos``: [1, 1, 1, d]."""
        if self.model.position_embedding_type != "rope":
            return None
        if self._rope is None or self._rope.size(0) <= pos:
            length = max(self.model.max_sequence_length, 2 * (pos + 1))
            self._rope = self.model.rotary_pos_emb(length)  # [length, 1, 1, d], positions 0..length-1
        return self._rope[pos: pos + 1]

    def _attention(self, layer, cache: LayerKVCache, hidden: torch.Tensor, rows: torch.Tensor, pos: int):
        """Self-attention of one new token per sequence in ``rows`` over that sequence's cache
        (which then holds it too). hidden [1, n, h]."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn = layer.self_attention
        query, key, value = attn.get_query_key_value_tensors(hidden, None)  # [1,n,np,hn], [1,n,ng,hn] x2
        rope = self._rope_at(pos)
        no_rope_freq = getattr(self.config, "no_rope_freq", None)
        no_rope = no_rope_freq[layer.layer_number - 1] if no_rope_freq else False
        if rope is not None and not no_rope:
            cp_group = getattr(getattr(attn, "pg_collection", None), "cp", None)
            query = apply_rotary_pos_emb(query, rope, config=attn.config, cp_group=cp_group)
            key = apply_rotary_pos_emb(key, rope, config=attn.config, cp_group=cp_group)
        keys, values, valid = cache.append(key, value, rows, pos)  # [n, L, ng, hn]
        q = query.permute(1, 2, 0, 3)  # [n, heads, 1, hn]
        k, v = keys.transpose(1, 2), values.transpose(1, 2)  # [n, groups, L, hn]
        if q.size(1) != k.size(1):
            rep = q.size(1) // k.size(1)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scale = getattr(attn.core_attention, "softmax_scale", None) or self.config.softmax_scale
        if scale is None:
            scale = q.size(-1) ** -0.5
        # One query over all cached (= earlier routed + own) keys: only padding is masked.
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.permute(2, 0, 1, 3).reshape(1, q.size(0), -1)  # [1, n, np*hn]
        return attn.linear_proj(out)  # (output, bias)

    def _block(self, i: int, x: torch.Tensor, rows: torch.Tensor, pos: int) -> torch.Tensor:
        """megatron's TransformerLayer on one token per sequence [1, n, h] with layer i's KV cache."""
        layer = self.layers[i]
        residual = x
        hidden = layer.input_layernorm(x)
        attn_out = self._attention(layer, self.caches[i], hidden, rows, pos)
        x = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(attn_out, residual, layer.hidden_dropout)
        return mlp_half(layer, x)

    def _mod_layer(self, i: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        layer = self.layers[i]
        router_logits = layer.router.scores(x)  # [b, 1]
        routed = layer.router.causal_decision(layer.router.causal_logits(x, router_logits))[:, 0].cpu()  # [b]
        for b, decision in enumerate(routed.tolist()):
            self.decisions[i][b].append(decision)
        rows = routed.nonzero().squeeze(-1)
        if rows.numel() == 0:
            return x  # around the layer: nothing enters its cache
        rows_dev = rows.to(x.device)
        selected = x[:, rows_dev]
        block_out = self._block(i, selected, rows, pos)
        idx = torch.zeros(rows.numel(), 1, dtype=torch.long, device=x.device)
        out = layer.combine(selected, idx, selected, block_out, router_logits[rows_dev])
        return x.index_copy(1, rows_dev, out)

    # -------------------------------------------------------------- public
    @torch.no_grad()
    def step(self, tokens: Union[int, Sequence[int]]) -> torch.Tensor:
        single = isinstance(tokens, int)
        ids = [int(tokens)] if single else [int(t) for t in tokens]
        if len(ids) != self.batch_size:
            raise InferenceError(f"step() got {len(ids)} tokens for a batch of {self.batch_size}")
        model, pos = self.model, self.pos
        if model.position_embedding_type != "rope" and pos >= model.max_sequence_length:
            raise InferenceError(f"position {pos} is beyond the learned position embeddings "
                                 f"(model.seq_length={model.max_sequence_length})")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device).unsqueeze(1)  # [b, 1]
        positions = torch.full_like(ids_t, pos)
        x = model.embedding(input_ids=ids_t, position_ids=positions)  # [1, b, h]
        for i in range(len(self.layers)):
            x = self._mod_layer(i, x, pos) if self.is_mod[i] else self._block(i, x, self._all_rows, pos)
        final_norm = getattr(model.decoder, "final_layernorm", None)
        if final_norm is not None:
            x = final_norm(x)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(x, weight=weight)  # [1, b, V]
        self.pos += 1
        return logits[0, 0].float() if single else logits[0].float()

    def cache_sizes(self, seq: int = 0) -> List[int]:
        """Number of K/V entries each layer's cache holds for sequence ``seq``."""
        return [c.size(seq) for c in self.caches]

    def layer_numbers(self) -> List[int]:
        return [layer.layer_number for layer in self.layers]


@torch.no_grad()
def full_forward_logits(model_chunk, token_ids: Sequence[int]) -> torch.Tensor:
    """The megatron GPTModel's full-sequence forward with every MoD layer on causal routing.

    Returns logits [s, padded_vocab] (float32); the MoD layers' routing mode is restored after.
    """
    from mod_train.model.mod import causal_routing

    model = model_of(model_chunk)
    was_training = model.training
    model.eval()
    try:
        with causal_routing([model]):
            device = next(model.parameters()).device
            tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
            positions = torch.arange(tokens.size(1), device=device).unsqueeze(0)
            logits = model(tokens, positions, None)  # [1, s, V]
    finally:
        model.train(was_training)
    return logits[0].float()
