"""Prompts -> new tokens with a KV cache and causal MoD routing (what ``mod-generate`` runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from mod_train.inference.decoder import KVCacheDecoder, model_of
from mod_train.inference.errors import InferenceError
from mod_train.inference.sampling import Sampling, next_tokens


@dataclass
class GenerationResult:
    """What one ``generate_batch`` call produced, per prompt ``b`` of the batch."""

    # New tokens of each prompt (ending with ``eod`` if it was sampled).
    tokens: List[List[int]]
    # Per prompt, [len(tokens[b]), padded_vocab]: the logits each new token was drawn from.
    logits: List[torch.Tensor]
    # Per layer: None (dense) or, per prompt, the causal routing decision of every consumed token.
    decisions: List[Optional[List[List[bool]]]]
    # Per prompt, per layer: K/V entries cached (a MoD layer: the tokens it routed).
    cache_sizes: List[List[int]]
    # Global layer number of each layer (megatron's 1-based numbering).
    layer_numbers: List[int]
    # Tokens consumed per sequence (prompt + fed-back tokens; the last sampled one is never fed back).
    positions: int

    def routed_counts(self, b: int = 0) -> Dict[int, int]:
        """Layer number -> tokens of prompt ``b`` its causal decision routed, for every MoD layer."""
        return {n: self.cache_sizes[b][i] for i, n in enumerate(self.layer_numbers) if self.decisions[i] is not None}

    def routed_share(self) -> List[float]:
        """Per MoD layer: the share of all consumed tokens (all prompts) it routed."""
        return [sum(map(sum, d)) / max(sum(map(len, d)), 1) for d in self.decisions if d is not None]


def vocab_limit(cfg, vocab_size: Optional[int], padded: int) -> int:
    """Rows of the padded output beyond the real vocabulary are never sampled."""
    if vocab_size is None and cfg is not None:
        vocab_size = getattr(getattr(cfg, "model", None), "vocab_size", None)
    return min(int(vocab_size), padded) if vocab_size else padded


def generate_batch(model_chunk, cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int, greedy: bool = True,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, *, eod: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> GenerationResult:
    """Sample up to ``max_new_tokens`` after each prompt; prompts of one length decode together (one
    decoder step serves the whole batch). Each sequence stops at its own ``eod``; the batch runs until
    all have stopped. Padded vocabulary entries beyond ``vocab_size`` (default ``cfg.model.vocab_size``)
    are never sampled. Sampling draws the rows of a step in order from one generator seeded by ``seed``.
    """
    sampling = Sampling(greedy=greedy, temperature=temperature, top_p=top_p, seed=seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InferenceError("the prompt is empty: give at least one token")
    if len({len(p) for p in prompts}) != 1:
        raise InferenceError(f"batched generation needs prompts of one length (the sequences share "
                             f"positions), got lengths {sorted({len(p) for p in prompts})}")
    if max_new_tokens < 0:
        raise InferenceError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model = model_of(model_chunk)
    was_training = model.training
    batch = len(prompts)
    decoder = KVCacheDecoder(model, batch_size=batch)  # puts the model in eval mode (no dropout)
    generator = sampling.generator()
    new_ids: List[List[int]] = [[] for _ in range(batch)]
    steps: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    running = list(range(batch))
    try:
        logits = None
        for column in zip(*prompts):
            logits = decoder.step(list(column))  # [b, V]
        limit = vocab_limit(cfg, vocab_size, logits.size(-1))
        for n in range(max_new_tokens):
            fed = [eod if eod is not None else 0] * batch  # stopped sequences feed a filler
            masked = logits.clone()
            masked[:, limit:] = float("-inf")
            for b, token in zip(running, next_tokens(masked, running, sampling, generator)):
                steps[b].append(logits[b])
                fed[b] = token
                new_ids[b].append(token)
            running = [b for b in running if eod is None or fed[b] != eod]
            if not running or n + 1 == max_new_tokens:
                break
            logits = decoder.step(fed)
    finally:
        model.train(was_training)
    width = logits.size(-1)
    return GenerationResult(
        tokens=new_ids,
        logits=[torch.stack(s) if s else torch.empty(0, width) for s in steps],
        decisions=decoder.decisions,
        cache_sizes=[decoder.cache_sizes(b) for b in range(batch)],
        layer_numbers=decoder.layer_numbers(),
        positions=decoder.pos,
    )


def generate(model_chunk, cfg, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs) -> GenerationResult:
    """``generate_batch`` for one prompt (a batch of one)."""
    return generate_batch(model_chunk, cfg, [prompt_ids], max_new_tokens, **kwargs)
