"""The training/generation tokenizer: a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json``.

Sentencepiece models go through megatron-core's tokenizer API. A ``tokenizer.json`` (or a
directory with one) is wrapped by :class:`HFTextTokenizer`, which exposes what megatron's text
tokenizer exposes to the datasets and to ``mod-generate`` (``eod``, ``pad``, ``tokenize``,
``detokenize``, ``vocab_size``, ``unique_identifiers``). Special tokens are resolved by
``data_prep.encoders``, the code that tokenized the data, so EOD is the same id in both.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

from data_prep._io import DataPrepError
from data_prep.encoders import HFEncoder, TokenizerKind, eod_id, resolve_tokenizer_file


class HFTextTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer with megatron's text-tokenizer interface."""

    def __init__(self, tokenizer_file: str):
        self.path = tokenizer_file
        self._encoder = HFEncoder(tokenizer_file)
        self._eod = eod_id(self._encoder)  # checked at load: training and generation need it

    def tokenize(self, text: str) -> List[int]:
        return self._encoder.encode_batch([text])[0]

    def detokenize(self, ids: List[int]) -> str:
        return self._encoder.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self._encoder.vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        return self._encoder.tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def unique_identifiers(self) -> OrderedDict:
        # megatron-core hashes these into its dataset cache key.
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("tokenizer_path", self.path)])

    def _special(self, name: str) -> int:
        value = getattr(self._encoder.special, name)
        if value is None:
            # megatron-core's datasets catch this and use their default (e.g. no pad token).
            raise AttributeError(f"tokenizer '{self.path}' has no {name} token")
        return value

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    eos_id = eos

    @property
    def pad(self) -> int:
        return self._special("pad")

    pad_id = pad

    @property
    def bos(self) -> int:
        return self._special("bos")

    bos_id = bos

    @property
    def unk(self) -> int:
        return self._special("unk")

    unk_id = unk


def load_tokenizer(model_path: Optional[str], mock_vocab_size: Optional[int] = None):
    """A text tokenizer (``.eod``, ``.pad``, ``.tokenize``, ``.detokenize``, ``.vocab_size``).

    ``model_path``: a sentencepiece ``.model``, a ``tokenizer.json`` or a directory with one.
    ``mock_vocab_size``: megatron-core's null tokenizer for synthetic data (``data.mock``), whose
    vocabulary is ids ``0..mock_vocab_size-1`` with the last id as end-of-document.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if mock_vocab_size is not None:
        # The null tokenizer adds its EOD id after the ids it is given.
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=mock_vocab_size - 1)
    if model_path is None or not Path(model_path).exists():
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    try:
        kind, file = resolve_tokenizer_file(model_path)
        if kind is TokenizerKind.HF:
            return HFTextTokenizer(file)
    except DataPrepError as e:
        raise ValueError(str(e)) from None
    # Our tokenizers come from data_prep (sentencepiece); no metadata.json is needed beside them.
    return MegatronTokenizer.from_pretrained(str(file), metadata_path={"library": "sentencepiece"})
