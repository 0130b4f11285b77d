"""What the tracking side writes into a run directory (``train.run_dir``), named once.

The trainer writes these files and ``mod-mlflow-sync`` reads them back, so both take the names
from here (and neither imports the other).
"""

from __future__ import annotations

METRICS_FILE = "metrics.jsonl"  # one JSON row per logged step (tracking/metrics_jsonl.py)
RESOLVED_CONFIG = "resolved_config.yaml"  # the composed, validated config of the run
LOSS_PLOT = "loss_vs_flops.png"  # tracking/plots.py: plot_loss_vs_flops
ROUTING_DIR = "routing"  # MoE routing heatmaps, one per checkpoint (also the MLflow artifact folder)
TENSORBOARD_DIR = "tensorboard"  # event files of the optional TensorBoard sink

# The MLflow run of this run directory, written as soon as the run exists (before any checkpoint),
# so a relaunch after a kill at any point continues the same run.
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
# Written when the job ended but could not deliver everything to MLflow (or set the final status):
# {"run_id", "status", "tracking_uri", "pending_metrics"}; mod-mlflow-sync finishes the run and
# removes it.
MLFLOW_UNFINISHED_FILE = "mlflow_unfinished.json"

# The MLflow tag holding the absolute run directory: how mod-mlflow-sync finds the run.
RUN_DIR_TAG = "run_dir"


def routing_heatmap_name(step: int) -> str:
    """``routing_iter_0000050.png``: the heatmap written at the checkpoint of ``step``."""
    return f"routing_iter_{step:07d}.png"
