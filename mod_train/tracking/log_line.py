"""The per-iteration console line, in Megatron-LM's format so existing log parsers keep working.

    [2026-11-22 10:00:00] iteration       10/     100 | consumed samples:          320 | ...
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Callable, Dict, Mapping, Optional

from mod_train.tracking import keys as K


def _int(width: int) -> Callable[[Any], str]:
    def fmt(v: Any) -> str:
        f = float(v)
        return f"{int(round(f)):{width}d}" if math.isfinite(f) else str(f)
    return fmt


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{float(v):.{digits}f}"


def _sci(v: Any) -> str:
    return f"{float(v):.6E}"


def _small(v: Any) -> str:
    # TFLOP/s on a CPU smoke run is ~1e-3: fixed point would print 0.00.
    f = float(v)
    return f"{f:.2f}" if f == 0 or abs(f) >= 0.01 or not math.isfinite(f) else f"{f:.2E}"


# Display order and format of the known keys; losses and unknown keys go between HEAD and TAIL.
_HEAD: Dict[str, Callable[[Any], str]] = {
    K.CONSUMED_SAMPLES: _int(12),
    K.ITER_TIME_MS: _fixed(1),
    K.LEARNING_RATE: _sci,
    K.GLOBAL_BATCH_SIZE: _int(5),
}
_TAIL: Dict[str, Callable[[Any], str]] = {
    K.LOSS_SCALE: _fixed(1),
    K.GRAD_NORM: _fixed(3),
    K.TOKENS_PER_S: _fixed(0),
    K.TFLOPS_PER_DEVICE: _small,
    K.MFU: lambda v: f"{float(v) * 100:.2f}%",
    K.MEMORY_GB: _fixed(2),
    K.SKIPPED_ITERATIONS: _int(3),
    K.NAN_ITERATIONS: _int(3),
    K.LOSS_SPIKES: _int(3),
    K.ROLLBACKS: _int(3),
}
_NOT_METRICS = (K.STEP, K.TIME)


def _generic(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:d}" if isinstance(v, int) else _sci(v)  # floats are losses: Megatron's .6E


def format_log_line(step: int, max_steps: int, metrics: Mapping[str, Any],
                    now: Optional[datetime] = None) -> str:
    """One Megatron-style line; only keys present (and not None) in ``metrics`` are shown.

    Known keys (mod_train.tracking.keys) get Megatron's formats and order; any other key (aux
    losses, ...) follows the global batch size in insertion order, floats as ``%.6E``.
    """
    stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    parts = [f" [{stamp}] iteration {int(step):8d}/{int(max_steps):8d} |"]

    def add(key: str, fmt: Callable[[Any], str]) -> None:
        value = metrics.get(key)
        if value is not None:
            parts.append(f" {key}: {fmt(value)} |")

    for key, fmt in _HEAD.items():
        add(key, fmt)
    for key in metrics:
        if key not in _HEAD and key not in _TAIL and key not in _NOT_METRICS:
            add(key, _generic)
    for key, fmt in _TAIL.items():
        add(key, fmt)
    return "".join(parts)
