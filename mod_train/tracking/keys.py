"""Names of the per-step training metrics, shared by the log line, metrics.jsonl, MLflow and plots.

Megatron's wording (with spaces) so the console output reads like Megatron-LM's and matches the
keys mod_train.engine.step already returns ("lm loss", "grad norm", "learning rate").
"""

from __future__ import annotations

CONSUMED_SAMPLES = "consumed samples"
ITER_TIME_MS = "elapsed time per iteration (ms)"
LEARNING_RATE = "learning rate"
GLOBAL_BATCH_SIZE = "global batch size"
LM_LOSS = "lm loss"
LOSS_SCALE = "loss scale"
GRAD_NORM = "grad norm"
TOKENS_PER_S = "tokens/s"
TFLOPS_PER_DEVICE = "TFLOP/s/device"
MFU = "MFU"  # model FLOPs utilization as a fraction of peak (0.42 == 42 %)
TOTAL_FLOPS = "total FLOPs"  # cumulative model FLOPs (all devices) up to this step; x of plots
SKIPPED_ITERATIONS = "skipped iterations"
NAN_ITERATIONS = "nan iterations"

# Bookkeeping fields of a metrics.jsonl row; not metrics.
STEP = "step"
TIME = "time"
