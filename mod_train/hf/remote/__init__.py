"""Modeling files copied into exported Hugging Face directories (see mod_train.hf.export)."""
