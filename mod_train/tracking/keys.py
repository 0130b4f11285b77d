"""Names of the per-step training metrics, shared by the log line, metrics.jsonl, MLflow and plots.

Megatron's wording (with spaces) so the console output reads like Megatron-LM's and matches the
keys mod_train.engine.step already returns ("lm loss", "grad norm", "learning rate").
Every metric name the code writes or reads is spelled here once; per-layer routing statistics
are built by ``mod_layer_key`` / ``moe_layer_key``.
"""

from __future__ import annotations

CONSUMED_SAMPLES = "consumed samples"
ITER_TIME_MS = "elapsed time per iteration (ms)"
LEARNING_RATE = "learning rate"
GLOBAL_BATCH_SIZE = "global batch size"
LM_LOSS = "lm loss"
LM_LOSS_CAUSAL = "lm loss (causal)"  # MoD eval: each layer routes by its causal decision
LOSS_SCALE = "loss scale"
GRAD_NORM = "grad norm"
TOKENS_PER_S = "tokens/s"
TFLOPS_PER_DEVICE = "TFLOP/s/device"
MFU = "MFU"  # model FLOPs utilization as a fraction of peak (0.42 == 42 %)
TOTAL_FLOPS = "total FLOPs"  # cumulative model FLOPs (all devices) up to this step; x of plots
MEMORY_GB = "memory (GB)"  # peak allocated accelerator memory of this rank (GPU only)
SKIPPED_ITERATIONS = "skipped iterations"
NAN_ITERATIONS = "nan iterations"
LOSS_SPIKES = "loss spikes"  # steps whose loss the spike detector flagged (train.spike)
ROLLBACKS = "rollbacks"  # reloads of the last checkpoint after a spike

# Evaluation metrics are the training names with this prefix: "valid lm loss".
VALID_PREFIX = "valid "

# Per-layer routing statistics: "<family>/layer<n>/<stat>" (one MLflow chart group per layer).
MOD_PREFIX = "mod"
MOE_PREFIX = "moe"
MOE_NOOP_FRAC = "noop_frac"  # integrated MoDE: share of routing slots sent to the no-op expert

# Bookkeeping fields of a metrics.jsonl row; not metrics.
STEP = "step"
TIME = "time"


def valid_key(key: str) -> str:
    """The evaluation twin of a training metric: ``valid_key(LM_LOSS) == "valid lm loss"``."""
    return VALID_PREFIX + key


def mod_layer_prefix(layer_number: int) -> str:
    """``mod/layer3``: the prefix of the statistics of the MoD layer ``layer_number`` (1-based)."""
    return f"{MOD_PREFIX}/layer{layer_number}"


def moe_layer_prefix(layer_number: int) -> str:
    """``moe/layer2``: the prefix of the statistics of the MoE layer ``layer_number`` (1-based)."""
    return f"{MOE_PREFIX}/layer{layer_number}"


def mod_layer_key(layer_number: int, stat: str) -> str:
    """``mod/layer3/aux_loss``: a statistic of the MoD layer ``layer_number`` (1-based)."""
    return f"{mod_layer_prefix(layer_number)}/{stat}"


def moe_layer_key(layer_number: int, stat: str) -> str:
    """``moe/layer2/load_e0``: a statistic of the MoE layer ``layer_number`` (1-based)."""
    return f"{moe_layer_prefix(layer_number)}/{stat}"


def is_moe_layer_stat(key: str, stat: str) -> bool:
    """Whether ``key`` is ``moe/layer<n>/<stat>`` for some layer n."""
    head, _, tail = key.partition("/")
    layer, _, name = tail.partition("/")
    return head == MOE_PREFIX and layer.startswith("layer") and layer[5:].isdigit() and name == stat
