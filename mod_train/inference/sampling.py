"""How the next token is chosen from the logits: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from mod_train.inference.errors import InferenceError


@dataclass(frozen=True)
class Sampling:
    """A validated choice of decoding: ``greedy`` (argmax), or sampling at ``temperature`` from the
    nucleus of mass ``top_p``, drawn from one generator seeded by ``seed``."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # A temperature <= 0 used to fall back to greedy silently; say so instead.
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InferenceError(f"temperature must be a number > 0, got {self.temperature}; "
                                 f"for argmax decoding use --greedy (greedy=True)")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed))


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


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> int:
    """Next token from logits [V] (already restricted to the real vocabulary by -inf entries)."""
    if sampling.greedy:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    scaled = scaled.masked_fill(~nucleus_mask(scaled, sampling.top_p), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def next_tokens(logits: torch.Tensor, rows: Sequence[int], sampling: Sampling,
                generator: Optional[torch.Generator]) -> List[int]:
    """The next token of each sequence in ``rows`` from logits [b, V]; rows are drawn in order from
    ``generator``. Greedy takes all argmaxes with one host sync."""
    if sampling.greedy:
        argmax = logits.argmax(dim=-1).tolist()
        return [argmax[b] for b in rows]
    return [sample_token(logits[b], sampling, generator) for b in rows]
