"""Experiment tracking: one run logger fanning out to MLflow, metrics.jsonl, the console log line
and (optionally) TensorBoard; throughput/MFU; plots; metric names (keys.py).

Plain values in, no torch.distributed: the training loop decides which rank tracks.
"""

from mod_train.tracking.flatten import PER_INVOCATION_KEYS, flatten_config, run_params  # noqa: F401
from mod_train.tracking.log_line import format_log_line  # noqa: F401
from mod_train.tracking.metrics_jsonl import MetricsJsonl, merged_rows, metrics_by_step, read_metrics  # noqa: F401
from mod_train.tracking.mlflow_run import MlflowTracker, default_tracking_uri  # noqa: F401
from mod_train.tracking.plots import plot_loss_vs_flops, plot_routing_heatmap  # noqa: F401
from mod_train.tracking.run_logger import RunLogger, open_run_logger  # noqa: F401
