"""Throughput and model FLOPs utilization of a logged step, from explicit inputs.

Plain numbers in, metrics (named by ``tracking.keys``) out: the trainer measures the time per step
and counts the FLOPs (``mod_train.model.flops``); this module only turns them into the figures of
the log line, so the arithmetic is tested without a model.
"""

from __future__ import annotations

from typing import Dict, Optional

from mod_train.tracking import keys as K


def throughput_metrics(*, seconds_per_step: float, tokens_per_step: int, flops_per_token: float,
                       world_size: int, consumed_samples: int, global_batch_size: int,
                       total_flops: float, peak_tflops: Optional[float] = None,
                       memory_gb: Optional[float] = None) -> Dict[str, float]:
    """The throughput metrics of one logged step.

    ``seconds_per_step``: mean training time per step since the last log line;
    ``flops_per_token``: model FLOPs (forward + backward) per token of this step, all devices;
    ``total_flops``: cumulative model FLOPs of the run up to this step (the x axis of
    loss_vs_flops.png); ``peak_tflops``: a device's peak dense TFLOP/s (MFU is left out
    without it); ``memory_gb``: peak accelerator memory of this rank (left out when None).
    """
    tokens_per_s = tokens_per_step / max(seconds_per_step, 1e-9)
    tflops_per_device = flops_per_token * tokens_per_s / max(world_size, 1) / 1e12
    out = {K.ITER_TIME_MS: seconds_per_step * 1000.0, K.TOKENS_PER_S: tokens_per_s,
           K.TFLOPS_PER_DEVICE: tflops_per_device, K.CONSUMED_SAMPLES: float(consumed_samples),
           K.GLOBAL_BATCH_SIZE: float(global_batch_size), K.TOTAL_FLOPS: float(total_flops)}
    if peak_tflops:
        out[K.MFU] = tflops_per_device / peak_tflops
    if memory_gb is not None:
        out[K.MEMORY_GB] = float(memory_gb)
    return out


def peak_memory_gb() -> Optional[float]:
    """This rank's peak allocated CUDA memory in GB, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 1e9
