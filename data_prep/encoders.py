"""Tokenizer files behind one interface: a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json``.

Used by data preparation (encoding) and by training and generation (through
``mod_train.data.tokenizer``), so both resolve the same special tokens from the same file:

* sentencepiece: the model's own pad/unk/bos/eos ids (``mod-prep-tokenizer`` fixes them at 0-3).
* Hugging Face: ``tokenizer.json``, or a directory holding one. The names of the special tokens
  come from a ``tokenizer_config.json`` beside it (``eos_token``, ``pad_token``, ...) when there is
  one, else from the usual names (``</s>``, ``<|endoftext|>``, ...; see ``_HF_NAMES``). Every
  resolved name must be in the vocabulary; end-of-document (EOD) is the EOS token.

Nothing here imports torch or megatron-core: data preparation starts encoding at once.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_prep._io import DataPrepError

HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"

# Special-token names tried in order when no tokenizer_config.json names them.
_HF_NAMES: Dict[str, Tuple[str, ...]] = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[BOS]"),
    "unk": ("<unk>", "<|unk|>", "[UNK]"),
}


class TokenizerKind(str, Enum):
    SENTENCEPIECE = "sentencepiece"
    HF = "hf"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens a tokenizer has (None: it has none)."""

    pad: Optional[int]
    unk: Optional[int]
    bos: Optional[int]
    eos: Optional[int]  # also end-of-document (EOD)


def resolve_tokenizer_file(path: str) -> Tuple[TokenizerKind, str]:
    """(kind, file) for a ``.model``, a ``tokenizer.json`` (any ``*.json``) or a directory with one.

    DataPrepError, saying what to pass instead, for anything else.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, HF_TOKENIZER_FILE)
        if not os.path.isfile(candidate):
            raise DataPrepError(f"tokenizer directory '{path}' has no {HF_TOKENIZER_FILE}; pass a sentencepiece "
                                f".model file, a {HF_TOKENIZER_FILE}, or a directory holding one")
        return TokenizerKind.HF, candidate
    if not os.path.isfile(path):
        raise DataPrepError(f"tokenizer model not found: '{path}' (from {os.getcwd()}); train one with "
                            f"mod-prep-tokenizer or pass the path of an existing .model or {HF_TOKENIZER_FILE}")
    if path.endswith(".json"):
        return TokenizerKind.HF, path
    return TokenizerKind.SENTENCEPIECE, path


class TextEncoder:
    """A loaded tokenizer: ``vocab_size``, ``special``, ``encode_batch``, ``decode``, ``token_to_id``."""

    kind: TokenizerKind
    path: str
    vocab_size: int
    special: SpecialTokens

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str], eod: Optional[int], dtype) -> Tuple[np.ndarray, np.ndarray]:
        """(all tokens back to back as ``dtype``, tokens per text), ``eod`` appended to each text.

        DataPrepError if an id does not fit below the vocabulary size (it would wrap in ``dtype``).
        """
        encoded = self.encode_batch(texts)
        extra = 0 if eod is None else 1
        lengths = np.fromiter((len(ids) + extra for ids in encoded), dtype=np.int64, count=len(encoded))
        if eod is None:
            flat_ids = itertools.chain.from_iterable(encoded)
        else:
            flat_ids = itertools.chain.from_iterable(itertools.chain(ids, (eod,)) for ids in encoded)
        flat = np.fromiter(flat_ids, dtype=np.int64, count=int(lengths.sum()))
        if flat.size and (int(flat.max()) >= self.vocab_size or int(flat.min()) < 0):
            bad = int(flat.max()) if int(flat.max()) >= self.vocab_size else int(flat.min())
            raise DataPrepError(f"tokenizer '{self.path}' produced id {bad}, outside its vocabulary of "
                                f"{self.vocab_size}; the tokenizer file is inconsistent")
        return flat.astype(dtype, copy=False), lengths


class SentencePieceEncoder(TextEncoder):
    kind = TokenizerKind.SENTENCEPIECE

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise DataPrepError(f"'{path}' is not a readable sentencepiece model: {e}") from None
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        ids = {name: getattr(self.sp, f"{name}_id")() for name in ("pad", "unk", "bos", "eos")}
        self.special = SpecialTokens(**{k: (v if v >= 0 else None) for k, v in ids.items()})

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


def _config_names(tokenizer_file: str) -> Dict[str, str]:
    """Special-token names from a tokenizer_config.json beside ``tokenizer_file`` (if any)."""
    config = os.path.join(os.path.dirname(os.path.abspath(tokenizer_file)), HF_CONFIG_FILE)
    if not os.path.isfile(config):
        return {}
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"'{config}' is not readable JSON: {e}") from None
    names = {}
    for kind in _HF_NAMES:
        value = data.get(f"{kind}_token")
        if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            names[kind] = value
    return names


class HFEncoder(TextEncoder):
    """A Hugging Face ``tokenizers.Tokenizer``; encodes without the post-processor's special tokens."""

    kind = TokenizerKind.HF

    def __init__(self, path: str, batch_threads: bool = False):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises a plain Exception for a malformed file
            raise DataPrepError(f"'{path}' is not a readable Hugging Face tokenizer.json: {e}") from None
        self.path = path
        # False: one text at a time on this thread (a worker process is one encoder); True: the
        # library's batch encoding on its own thread pool.
        self.batch_threads = batch_threads
        vocab = self.tok.get_vocab(with_added_tokens=True)
        # Embedding rows needed: ids need not be dense, so take the largest one.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        named = _config_names(path)
        resolved: Dict[str, Optional[int]] = {}
        for kind, candidates in _HF_NAMES.items():
            if kind in named:
                tid = vocab.get(named[kind])
                if tid is None:
                    raise DataPrepError(f"{HF_CONFIG_FILE} beside '{path}' names {kind}_token "
                                        f"{named[kind]!r}, which is not in the tokenizer's vocabulary")
                resolved[kind] = tid
            else:
                resolved[kind] = next((vocab[n] for n in candidates if n in vocab), None)
        self.special = SpecialTokens(**resolved)
        if self.special.pad is not None and self.special.pad == self.special.eos:
            raise DataPrepError(f"tokenizer '{path}': the pad token is the EOS/end-of-document token (id "
                                f"{self.special.pad}); padding would be read as document ends. Give it a "
                                f"distinct pad token")

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self.batch_threads or not _library_parallelism():
            # Batch encoding without offsets: ~10% faster than one call per text, on one thread
            # where the library's parallelism is off (worker processes turn it off).
            return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        encode = self.tok.encode
        return [encode(t, add_special_tokens=False).ids for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)


def _library_parallelism() -> bool:
    """Whether the Hugging Face library's batch encoding may use several threads (its own rule)."""
    return os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() not in ("", "false", "0", "off", "no")


def load_encoder(path: str) -> TextEncoder:
    """The tokenizer at ``path`` (see :func:`resolve_tokenizer_file`), special tokens resolved."""
    kind, file = resolve_tokenizer_file(path)
    return HFEncoder(file) if kind is TokenizerKind.HF else SentencePieceEncoder(file)


def eod_id(encoder: TextEncoder) -> int:
    """The end-of-document id, or DataPrepError saying how to get one."""
    eos = encoder.special.eos
    if eos is None:
        names = ", ".join(_HF_NAMES["eos"]) if encoder.kind is TokenizerKind.HF else "an EOS piece"
        raise DataPrepError(f"tokenizer '{encoder.path}' has no EOS token to use as end-of-document (looked "
                            f"for {names}); name one as eos_token in a {HF_CONFIG_FILE} beside it, retrain it "
                            f"with mod-prep-tokenizer, or pass --no-eod")
    return eos
