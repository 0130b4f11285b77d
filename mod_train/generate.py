"""`mod-generate`: autoregressive sampling from a checkpoint, with a KV cache and causal MoD routing.

    mod-generate --checkpoint runs/demo/checkpoints [--iter N | --iter latest] \\
        --prompt "Once upon a time" --max-new-tokens 50 [--greedy | --temperature 0.8 --top-p 0.9] --seed 0

Top-k routing looks at the whole sequence, so it cannot be used while sampling. Each MoD layer
instead routes every new token by its own causal decision (``router.causal_decision``: the router's
logit or the predictor MLP's, trained towards top-k membership, above the layer's threshold calibrated
during training so that the routed share matches the capacity):

* a routed token runs the layer's block (attention over the earlier tokens routed to this layer,
  rotary embedding at its absolute position, then the MLP), its output is weighted exactly as
  ``MoDTransformerLayer.combine`` does, and its K/V are appended to this layer's cache;
* a token routed around the layer passes through unchanged and adds nothing to this layer's cache.

This is the same computation as a full-sequence forward with every MoD layer's ``routing`` set to
``"causal"`` (``MoDTransformerLayer._forward_causal``); :func:`full_forward_logits` runs that
reference and the tests check that both give the same logits.

The decoder below runs over the weights of the megatron-core modules themselves (embedding, each
layer's ``input_layernorm``, ``self_attention.get_query_key_value_tensors`` (megatron's grouped QKV
layout), ``linear_proj``, the layer's bias-dropout-add and ``_forward_mlp``, the final layernorm and
``output_layer``); only the attention over the KV cache is written here. Prompts are prefilled token
by token. ``generate_batch`` decodes several prompts of one length together: in a MoD layer the
sequences whose token is routed run the block as one batch, each over its own cache.

Checkpoints: ``<root>/iter_XXXXXXX/`` with ``complete.json`` (the resolved config under
``"config"``) and DeepSpeed's ``state/`` directory. Only layouts with tensor- and pipeline-parallel
size 1 are supported (any data-parallel size and ZeRO stage 0-3).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mod_train.model.unwrap import MultipleChunksError, unwrap_model

DS_TAG = "state"  # mirrors mod_train.checkpoint.state.DS_TAG
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class GenerateError(RuntimeError):
    """A checkpoint or request mod-generate cannot serve; the message says why."""


# ----------------------------------------------------------------------------- helpers
def _model_of(model):
    """The GPTModel inside a ModelChunks / DeepSpeed engine / list of chunks (GenerateError if several)."""
    try:
        return unwrap_model(model)
    except MultipleChunksError as e:
        raise GenerateError(f"generation: {e}") from e


def _mod_layer_class():
    from mod_train.model.mod import MoDTransformerLayer

    return MoDTransformerLayer


def _check_generatable(model) -> None:
    cfg = model.config
    if not (model.pre_process and model.post_process):
        raise GenerateError("generation needs the whole model in one chunk (pipeline-parallel size 1)")
    if cfg.tensor_model_parallel_size != 1 or cfg.pipeline_model_parallel_size != 1:
        raise GenerateError(f"generation supports tensor/pipeline-parallel size 1 only, the model has "
                            f"tp={cfg.tensor_model_parallel_size} pp={cfg.pipeline_model_parallel_size}")
    if getattr(cfg, "multi_latent_attention", False):
        raise GenerateError("multi-latent attention is not supported by the KV-cache decoder")


class _LayerCache:
    """K/V of the tokens one layer has processed, per sequence of the batch.

    Storage [batch, capacity, groups, head_dim], grown by doubling. Sequences fill at their own
    pace (a MoD layer caches only the tokens it routed), so each has its own length; attention
    masks the unused tail of the shorter ones.
    """

    def __init__(self, batch: int) -> None:
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.positions: List[List[int]] = [[] for _ in range(batch)]

    def append(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, pos: int):
        """Add one token's k/v [1, n, g, d] for the sequences ``rows`` [n]; return their keys and
        values [n, L, g, d] and, if their lengths differ, a mask [n, L] of the valid entries."""
        need = int(self.lengths[rows].max()) + 1
        if self.k is None or need > self.k.size(1):
            cap = max(16, 2 * need)
            shape = (self.lengths.numel(), cap) + tuple(k.shape[2:])
            new_k, new_v = k.new_zeros(shape), v.new_zeros(shape)
            if self.k is not None:
                new_k[:, : self.k.size(1)] = self.k
                new_v[:, : self.v.size(1)] = self.v
            self.k, self.v = new_k, new_v
        rows_dev = rows.to(self.k.device)
        at = self.lengths[rows].to(self.k.device)
        self.k[rows_dev, at] = k[0]
        self.v[rows_dev, at] = v[0]
        self.lengths[rows] += 1
        for r in rows.tolist():
            self.positions[r].append(pos)
        lengths = self.lengths[rows]
        longest = int(lengths.max())
        keys, values = self.k[rows_dev, :longest], self.v[rows_dev, :longest]
        if bool((lengths == longest).all()):
            return keys, values, None
        mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
        return keys, values, mask.to(self.k.device)

    def size(self, seq: int = 0) -> int:
        return int(self.lengths[seq])


# ----------------------------------------------------------------------------- the KV-cache decoder
class KVCacheDecoder:
    """Token-by-token inference over a megatron GPTModel (TP=PP=1) with per-layer KV caches, for a
    batch of sequences that advance together (one position per step, the same for all).

    ``step(tokens)`` consumes the next token of each sequence (at absolute position ``self.pos``)
    and returns the logits [batch, padded_vocab] predicting the token after it; given one int
    (batch 1) it returns [padded_vocab]. In a MoD layer each sequence's token is routed by its own
    causal decision: the routed ones run the block together, the others pass through.
    """

    def __init__(self, model, batch_size: int = 1) -> None:
        self.model = _model_of(model)
        _check_generatable(self.model)
        self.config = self.model.config
        self.batch_size = batch_size
        self.layers = list(self.model.decoder.layers)
        self.caches = [_LayerCache(batch_size) for _ in self.layers]
        mod_cls = _mod_layer_class()
        self.is_mod = [isinstance(layer, mod_cls) for layer in self.layers]
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

    def _attention(self, layer, cache: _LayerCache, hidden: torch.Tensor, rows: torch.Tensor, pos: int):
        """Self-attention of one new token per sequence in ``rows`` over that sequence's cache
        (which then holds it too). hidden [1, n, h]."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn = layer.self_attention
        query, key, value = attn.get_query_key_value_tensors(hidden, None)  # [1,n,np,hn], [1,n,ng,hn] x2
        rope = self._rope_at(pos)
        no_rope = self.config.no_rope_freq[layer.layer_number - 1] if getattr(self.config, "no_rope_freq", None) else False
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
        return layer._forward_mlp(x)  # pre_mlp_layernorm -> mlp (or MoE) -> bias-dropout-add

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
    def step(self, tokens) -> torch.Tensor:
        single = isinstance(tokens, int)
        ids = [int(tokens)] if single else [int(t) for t in tokens]
        if len(ids) != self.batch_size:
            raise GenerateError(f"step() got {len(ids)} tokens for a batch of {self.batch_size}")
        model, pos = self.model, self.pos
        if model.position_embedding_type != "rope" and pos >= model.max_sequence_length:
            raise GenerateError(f"position {pos} is beyond the learned position embeddings "
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


# ----------------------------------------------------------------------------- sampling
def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask over ``logits`` [V] of the nucleus: the smallest set of most likely tokens whose
    probability reaches ``top_p`` (always at least the most likely token)."""
    if top_p >= 1.0:
        return torch.isfinite(logits)
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[0] = True
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask


def sample_token(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float,
                 generator: Optional[torch.Generator]) -> int:
    """Next token from logits [V] (already restricted to the real vocabulary by -inf entries)."""
    if greedy or temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    scaled = scaled.masked_fill(~nucleus_mask(scaled, top_p), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _vocab_limit(cfg, vocab_size: Optional[int], padded: int) -> int:
    if vocab_size is None and cfg is not None:
        vocab_size = getattr(getattr(cfg, "model", None), "vocab_size", None)
    return min(int(vocab_size), padded) if vocab_size else padded


def generate(model_chunk, cfg, prompt_ids: Sequence[int], max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, *, eod: Optional[int] = None,
             vocab_size: Optional[int] = None) -> Tuple[List[int], torch.Tensor]:
    """Sample up to ``max_new_tokens`` after ``prompt_ids`` with a KV cache and causal MoD routing.

    Returns ``(token_ids, logits_per_step)``: the new tokens (ending with ``eod`` if it was
    sampled) and a [len(token_ids), padded_vocab] tensor of the logits each was drawn from
    (position ``len(prompt_ids) - 1 + i`` of the sequence). Padded vocabulary entries beyond
    ``vocab_size`` (default ``cfg.model.vocab_size``) are never sampled.
    """
    new, per_step = generate_batch(model_chunk, cfg, [prompt_ids], max_new_tokens, greedy, temperature, top_p,
                                   seed, eod=eod, vocab_size=vocab_size)
    generate.last_decoder = generate_batch.last_decoder
    return new[0], per_step[0]


def generate_batch(model_chunk, cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int, greedy: bool = True,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, *, eod: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> Tuple[List[List[int]], List[torch.Tensor]]:
    """``generate`` for several prompts of the same length at once: one decoder step serves the
    whole batch. Each sequence stops at its own ``eod``; the batch runs until all have stopped.

    Returns the new tokens of each prompt and, per prompt, the [n_i, padded_vocab] logits they were
    drawn from. Sampling draws the rows of a step in order from one generator seeded by ``seed``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerateError("the prompt is empty: give at least one token")
    if len({len(p) for p in prompts}) != 1:
        raise GenerateError(f"batched generation needs prompts of one length (the sequences share "
                            f"positions), got lengths {sorted({len(p) for p in prompts})}")
    if not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p}")
    model = _model_of(model_chunk)
    was_training = model.training
    batch = len(prompts)
    decoder = KVCacheDecoder(model, batch_size=batch)  # puts the model in eval mode (no dropout)
    generator = torch.Generator().manual_seed(int(seed))
    new_ids: List[List[int]] = [[] for _ in range(batch)]
    steps: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    running = list(range(batch))
    try:
        logits = None
        for column in zip(*prompts):
            logits = decoder.step(list(column))  # [b, V]
        limit = _vocab_limit(cfg, vocab_size, logits.size(-1))
        for n in range(max_new_tokens):
            next_tokens = [eod if eod is not None else 0] * batch  # stopped sequences feed a filler
            masked = logits.clone()
            masked[:, limit:] = float("-inf")
            argmax = masked.argmax(dim=-1).tolist() if greedy or temperature <= 0 else None  # one sync
            for b in running:
                steps[b].append(logits[b])
                next_tokens[b] = argmax[b] if argmax is not None else \
                    sample_token(masked[b], greedy, temperature, top_p, generator)
                new_ids[b].append(next_tokens[b])
            running = [b for b in running if eod is None or next_tokens[b] != eod]
            if not running or n + 1 == max_new_tokens:
                break
            logits = decoder.step(next_tokens)
    finally:
        model.train(was_training)
    width = logits.size(-1)
    per_step = [torch.stack(s) if s else torch.empty(0, width) for s in steps]
    generate_batch.last_decoder = decoder  # for inspection (cache sizes, routing decisions)
    return new_ids, per_step


generate_batch.last_decoder = None
generate.last_decoder = None


# ----------------------------------------------------------------------------- the reference
@torch.no_grad()
def full_forward_logits(model_chunk, token_ids: Sequence[int]) -> torch.Tensor:
    """The megatron GPTModel's full-sequence forward with every MoD layer on causal routing.

    Returns logits [s, padded_vocab] (float32); the MoD layers' routing mode is restored after.
    """
    from mod_train.model.mod import causal_routing

    model = _model_of(model_chunk)
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


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str, iteration: str = "latest") -> Path:
    """The ``iter_*`` directory to load: ``path`` is a checkpoint root or an ``iter_*`` directory."""
    from mod_train.checkpoint.layout import COMPLETE_FILE, CheckpointDir, iter_name

    p = Path(path).expanduser()
    if not p.exists():
        raise GenerateError(f"checkpoint path {p} does not exist (give the checkpoint root, e.g. "
                            f"runs/<run>/checkpoints, or one of its iter_* directories)")
    if not p.is_dir():
        raise GenerateError(f"checkpoint path {p} is not a directory")
    if (p / COMPLETE_FILE).is_file():
        if iteration not in (None, "latest"):
            raise GenerateError(f"{p} is already a single checkpoint; drop --iter or pass its root directory")
        return p
    root = CheckpointDir(p)
    available = root.list_complete()
    names = ", ".join(d.name for _, d in available) or "none"
    if not available:
        raise GenerateError(f"no complete checkpoint under {p} (no iter_*/{COMPLETE_FILE}); complete "
                            f"checkpoints: none")
    if iteration in (None, "latest"):
        found = root.find_latest()
        assert found is not None
        return found[1]
    try:
        step = int(iteration)
    except ValueError:
        raise GenerateError(f"--iter must be a step number or 'latest', got {iteration!r}") from None
    for s, d in available:
        if s == step:
            return d
    raise GenerateError(f"no complete checkpoint for step {step} ({iter_name(step)}) under {p}; "
                        f"complete checkpoints: {names}")


def check_supported_layout(cfg) -> None:
    par = cfg.parallel
    bad = []
    if par.tp != 1:
        bad.append(f"parallel.tp={par.tp}")
    if par.pp != 1:
        bad.append(f"parallel.pp={par.pp}")
    if par.vpp:
        bad.append(f"parallel.vpp={par.vpp}")
    if par.ep != 1:
        bad.append(f"parallel.ep={par.ep}")
    if par.cp != 1:
        bad.append(f"parallel.cp={par.cp}")
    if bad:
        raise GenerateError(
            f"this checkpoint was written with {', '.join(bad)}; mod-generate supports checkpoints written "
            f"with parallel.tp=1 and parallel.pp=1 (no virtual pipeline, ep=1, cp=1), with any data-parallel "
            f"size and ZeRO stage 0-3")


def _strip_chunk_prefix(state: dict) -> dict:
    """ModelChunks keys ``0.<name>`` -> ``<name>`` (the GPTModel of chunk 0)."""
    if any(k.startswith("1.") for k in state):
        raise GenerateError("the checkpoint holds more than one model chunk (virtual pipeline); "
                            "mod-generate supports tp=1 pp=1 checkpoints only")
    if all(k.startswith("0.") for k in state):
        return {k[2:]: v for k, v in state.items()}
    return dict(state)


def load_model_state(iter_dir: Path, zero_stage: Optional[int] = None) -> dict:
    """The GPTModel state dict of chunk 0 from ``<iter_dir>/state`` (DeepSpeed, any ZeRO stage)."""
    ds_dir = Path(iter_dir) / DS_TAG
    if not ds_dir.is_dir():
        raise GenerateError(f"{iter_dir} has no DeepSpeed '{DS_TAG}' directory: not a mod-train checkpoint")
    other_mp = sorted(p.name for p in ds_dir.glob("*mp_rank_*_model_states.pt") if "mp_rank_00_" not in p.name)
    if other_mp:
        raise GenerateError(f"{ds_dir} holds model-parallel shards ({other_mp[0]}, ...): mod-generate supports "
                            f"checkpoints written with parallel.tp=1 and parallel.pp=1 only")
    plain, zero3 = ds_dir / MODEL_STATES, ds_dir / ZERO3_MODEL_STATES
    if plain.is_file() and zero_stage != 3:
        blob = torch.load(plain, map_location="cpu", weights_only=False)
        if "module" not in blob or blob["module"] is None:
            raise GenerateError(f"{plain} has no 'module' entry")
        return _strip_chunk_prefix(blob["module"])
    if zero3.is_file() or zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(iter_dir), tag=DS_TAG)
        return _strip_chunk_prefix(state)
    raise GenerateError(f"{ds_dir} has neither {MODEL_STATES} nor {ZERO3_MODEL_STATES}")


# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_TO_LOCAL = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)


def _match_keys(state: dict, wanted: set) -> dict:
    """Rename fused-norm keys between Transformer Engine and local specs; drop TE extra state."""
    out = {}
    for key, value in state.items():
        if key not in wanted:
            for te, local in _TE_TO_LOCAL:
                for a, b in ((te, local), (local, te)):
                    if key.endswith(a) and key[: -len(a)] + b in wanted:
                        key = key[: -len(a)] + b
                        break
                else:
                    continue
                break
        if key.endswith("._extra_state") and key not in wanted:
            continue
        out[key] = value
    return out


def load_weights(model, state: dict) -> None:
    model = _model_of(model)
    wanted = set(model.state_dict().keys())
    state = _match_keys(state, wanted)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise GenerateError(f"checkpoint does not match the model built from its config: missing "
                            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def load_for_generation(checkpoint: str, iteration: str = "latest", tokenizer_path: Optional[str] = None):
    """(model GPTModel in eval mode, typed Config, tokenizer, iter dir). Inside ``world_of_one()``.

    Checkpoints hold a layout-free ``model/`` (megatron dist-checkpointing): it loads into the
    same model laid out for one process, whatever TP/PP/EP the training used. Checkpoints
    without it are read from DeepSpeed's files, which needs a TP1/PP1/EP1 training layout.
    """
    from mod_train.checkpoint.layout import read_metadata
    from mod_train.checkpoint.model_io import MODEL_DIR, is_model_dir, load_model
    from mod_train.config.validate import ConfigError, tokenizer_vocab_size, validate
    from mod_train.data.tokenizer import load_tokenizer
    from mod_train.distributed.world_of_one import config_from_metadata, single_process_layout
    from mod_train.model.build import build_model_chunks

    iter_dir = resolve_checkpoint(checkpoint, iteration)
    try:
        metadata = read_metadata(iter_dir)
        cfg = config_from_metadata(metadata)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot use {iter_dir}/complete.json: {e}") from e
    layout_free = is_model_dir(iter_dir / MODEL_DIR)
    if layout_free:
        cfg = single_process_layout(cfg)
    else:
        check_supported_layout(cfg)
    tok_path = tokenizer_path or cfg.data.tokenizer_model
    if not Path(tok_path).exists():  # a .model, a tokenizer.json, or a directory with one
        raise GenerateError(f"tokenizer model {tok_path!r} (data.tokenizer_model of the checkpoint's config) "
                            f"not found from {os.getcwd()}; pass --tokenizer PATH")
    tokenizer = load_tokenizer(tok_path)
    tok_vocab = tokenizer_vocab_size(tok_path)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok_vocab
    elif cfg.model.vocab_size != tok_vocab:
        raise GenerateError(f"the tokenizer {tok_path} has {tok_vocab} tokens but the model was trained with "
                            f"model.vocab_size={cfg.model.vocab_size}")
    try:
        derived = validate(cfg, world_size=1, check_files=False, has_cuda=torch.cuda.is_available())
    except ConfigError as e:
        raise GenerateError(f"the checkpoint's config does not validate: {e}") from e
    chunks = build_model_chunks(cfg, derived)
    model = chunks[0]
    if layout_free:
        load_model(chunks, iter_dir / MODEL_DIR)
    else:
        load_weights(model, load_model_state(iter_dir, cfg.parallel.zero_stage))
    model.eval()
    return model, cfg, tokenizer, iter_dir


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mod-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (runs/<run>/checkpoints) or an iter_* dir")
    p.add_argument("--iter", default="latest", help="step to load, or 'latest' (default)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (empty: start from the end-of-document token); repeat for several "
                        "prompts: those of one token length are decoded together as a batch")
    p.add_argument("--max-new-tokens", type=int, default=50)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override data.tokenizer_model of the checkpoint's config")
    p.add_argument("--show-routing", action="store_true", help="also print per-MoD-layer routed-token counts")
    return p


def _run(args) -> None:
    model, cfg, tokenizer, _ = load_for_generation(args.checkpoint, args.iter, args.tokenizer)
    texts = args.prompt or [""]
    prompts = [list(tokenizer.tokenize(t)) if t else [] for t in texts]
    prompts = [p or [tokenizer.eod] for p in prompts]
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    outputs: List[str] = [""] * len(prompts)
    for group in by_length.values():
        news, _ = generate_batch(model, cfg, [prompts[i] for i in group], args.max_new_tokens, greedy=args.greedy,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 eod=tokenizer.eod, vocab_size=cfg.model.vocab_size)
        for i, new_ids in zip(group, news):
            shown = new_ids[:-1] if new_ids and new_ids[-1] == tokenizer.eod else new_ids
            # Detokenize prompt and continuation together so word boundaries come out right.
            text_ids = shown if prompts[i] == [tokenizer.eod] else prompts[i] + shown
            outputs[i] = tokenizer.detokenize(text_ids)
        if args.show_routing:
            dec = generate_batch.last_decoder
            for row, i in enumerate(group):
                for n, (layer, size) in enumerate(zip(dec.layers, dec.cache_sizes(row))):
                    if dec.is_mod[n]:
                        print(f"[prompt {i + 1}, layer {layer.layer_number}: {size}/{dec.pos} tokens routed]",
                              file=sys.stderr)
    print("\n-----\n".join(outputs))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mod_train.distributed.world_of_one import SingleProcessError, world_of_one

    args = _parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise SystemExit("mod-generate: --max-new-tokens must be >= 0")
    try:
        with world_of_one():
            _run(args)
    except (GenerateError, SingleProcessError) as e:
        raise SystemExit(f"mod-generate: error: {e}") from None
    return 0


if __name__ == "__main__":
    # Here, not in main(): tests call main() in-process. Dependency warnings summed up in one line.
    from mod_train.tracking.console import configure_console

    configure_console(program="mod-generate")
    sys.exit(main())
