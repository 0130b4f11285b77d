"""Load the sentencepiece tokenizer through megatron-core's tokenizer API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def load_tokenizer(model_path: Optional[str], mock_vocab_size: Optional[int] = None):
    """A megatron-core text tokenizer (``.eod``, ``.pad``, ``.tokenize``, ``.detokenize``).

    ``mock_vocab_size``: megatron-core's null tokenizer for synthetic data (``data.mock``), whose
    vocabulary is ids ``0..mock_vocab_size-1`` with the last id as end-of-document.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if mock_vocab_size is not None:
        # The null tokenizer adds its EOD id after the ids it is given.
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=mock_vocab_size - 1)
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    # Our tokenizers come from data_prep (sentencepiece); no metadata.json is needed beside them.
    return MegatronTokenizer.from_pretrained(str(path), metadata_path={"library": "sentencepiece"})
