"""Experiment tracking: MLflow run lifecycle, metrics.jsonl, the console log line, plots.

Plain values in, no torch.distributed: the training loop decides which rank tracks.
"""

from mod_train.tracking.flatten import flatten_config  # noqa: F401
from mod_train.tracking.log_line import format_log_line  # noqa: F401
from mod_train.tracking.metrics_jsonl import MetricsJsonl, read_metrics  # noqa: F401
from mod_train.tracking.mlflow_run import MlflowTracker, default_tracking_uri  # noqa: F401
from mod_train.tracking.plots import plot_loss_vs_flops  # noqa: F401
