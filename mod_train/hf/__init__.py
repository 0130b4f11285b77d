"""Hugging Face ``transformers`` doors: export (``mod-export --format hf``), import
(``checkpoint.init_from=hf:<dir>``) and lm-evaluation-harness (``mod-eval``).

Needs the optional extra ``hf`` (``pip install -e '.[hf]'``): transformers, safetensors, lm-eval.
``remote/`` holds the configuration and modeling files copied into exported MoD/MoE/MoDE
directories (loaded with ``trust_remote_code=True``).
"""
