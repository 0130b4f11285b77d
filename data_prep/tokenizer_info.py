"""What every tokenizer mod-prep-tokenizer trains shares, whatever the library: the fixed special
ids and pieces (pad=0 unk=1 bos=2 eos/EOD=3) and the summary of a training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from data_prep._io import DataPrepError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
NUM_FIXED_SPECIAL = 4


@dataclass
class TokenizerInfo:
    model_path: str
    vocab_path: str
    vocab_size: int
    model_type: str
    special_ids: Dict[str, int]
    sentences: int  # training sentences (non-blank lines) seen
    seconds: float


def empty_corpus_message(files: List[str]) -> str:
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"empty corpus: no non-blank documents in {shown}"


def checked_special_tokens(special_tokens: Sequence[str]) -> List[str]:
    """The user's extra special tokens, deduplicated in order; the built-in four and blank or
    padded names are refused (both tokenizer kinds reserve ids 0-3 the same way)."""
    tokens = list(dict.fromkeys(special_tokens))
    reserved = {PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE} & set(tokens)
    if reserved:
        raise DataPrepError(f"special tokens {sorted(reserved)} are built in (ids 0-3); do not pass them again")
    if any(not t or t != t.strip() for t in tokens):
        raise DataPrepError("special tokens must be non-empty and have no surrounding whitespace")
    return tokens
