"""Learning-rate schedules: linear warmup, then cosine, constant, or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math

from mod_train.config.schema import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the LR used by the step-th update)."""
    warmup = optim.warmup_steps
    if warmup > 0 and step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = optim.decay_steps or max_steps
    if optim.schedule == "cosine":
        span = max(decay_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
    # WSD: hold the peak, then decay linearly to min_lr over the last fraction of decay_steps.
    decay_start = decay_steps - int(optim.wsd_decay_fraction * decay_steps)
    if step < decay_start:
        return optim.lr
    progress = min((step - decay_start) / max(decay_steps - decay_start, 1), 1.0)
    return optim.lr + (optim.min_lr - optim.lr) * progress


def lambda_for(optim: OptimConfig, max_steps: int):
    """Multiplier on the base LR for torch's LambdaLR (the base LR is optim.lr)."""
    return lambda step: lr_at(step, optim, max_steps) / optim.lr
