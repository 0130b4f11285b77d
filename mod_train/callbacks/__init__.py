"""What the training loop calls at its hooks, one concern per file (OLMo-core style).

``base.Callback`` names the hooks; ``metrics_logging`` (log line, throughput/MFU, skip counters),
``routing_heatmap`` and ``loss_plot`` (plots at checkpoints), ``watchdog`` (hung steps),
``checkpointing`` (when and what to save, restore for a rollback) and ``flops`` (the run's FLOP
account shared by logging and checkpoints) are the pieces ``mod_train.trainer`` wires together.
"""
