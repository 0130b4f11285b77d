"""Load the sentencepiece tokenizer through megatron-core's tokenizer API."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_path: str):
    """A megatron-core text tokenizer (``.eod``, ``.pad``, ``.tokenize``, ``.detokenize``)."""
    from megatron.core.tokenizers import MegatronTokenizer

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    # Our tokenizers come from data_prep (sentencepiece); no metadata.json is needed beside them.
    return MegatronTokenizer.from_pretrained(str(path), metadata_path={"library": "sentencepiece"})
