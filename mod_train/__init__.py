"""mod-train: GPT pretraining with Mixture-of-Depths / Mixture-of-Experts layers."""
