"""What every tokenizer mod-prep-tokenizer trains shares, whatever the library: the fixed special
ids and pieces (pad=0 unk=1 bos=2 eos/EOD=3) and the summary of a training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

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
