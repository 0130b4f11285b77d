"""Inference from a trained model in one process: the code behind ``mod-generate`` and ``mod-export``.

* ``loader.py``: one loader of a single-process GPTModel from any checkpoint (any TP/PP/EP/DP/ZeRO
  layout), shared by both CLIs;
* ``kv_cache.py``: per-layer K/V storage; ``decoder.py``: the token-by-token decoder over the
  megatron-core modules with causal MoD routing, and the full-sequence reference it must equal;
* ``sampling.py``: greedy / temperature / nucleus choice of the next token;
* ``generation.py``: prompts -> new tokens (``GenerationResult``);
* ``export.py``: a checkpoint -> one layout-free ``.pt`` file.

Nothing here trains; importing this package imports no torch (the modules do).
"""
