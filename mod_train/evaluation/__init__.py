"""Downstream evaluation with lm-evaluation-harness (``mod-eval``): tasks, our LM class, MLflow logging."""
