"""Checks of an indexed dataset (.bin/.idx) against itself and the tokenizer, before training.

Megatron-core trusts the pair: a .bin cut short or an .idx of another dataset fails deep inside
the dataset builder (``offset must be non-negative``) or, worse, trains on the wrong tokens; ids
from a larger vocabulary crash in the embedding. Here each of these is one clear error naming
the file, raised from the one validation pass (no process group exists yet). No torch import.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from data_prep.indexed_format import IndexFormatError, read_index

# Up to this many bytes the whole .bin is scanned for the largest token id (about a second per
# GB); above it, evenly spaced windows are (a different tokenizer shows up in any window).
FULL_SCAN_BYTES = 2 << 30
SAMPLE_WINDOWS = 64
WINDOW_BYTES = 16 << 20


class DatasetCheckError(ValueError):
    """An indexed dataset that cannot be trained on; the message names the file."""


def _max_token(bin_path: str, dtype: np.dtype, tokens: int) -> int:
    if tokens == 0:
        return -1
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens,))
    per_window = max(1, WINDOW_BYTES // dtype.itemsize)
    if tokens * dtype.itemsize <= FULL_SCAN_BYTES:
        starts = range(0, tokens, per_window)
    else:
        starts = sorted({int(s) for s in np.linspace(0, tokens - per_window, SAMPLE_WINDOWS)} | {tokens - per_window})
    return max(int(data[s:s + per_window].max()) for s in starts)


def check_indexed_dataset(prefix: str, vocab_size: Optional[int]) -> None:
    """``prefix``.idx readable, ``prefix``.bin exactly as long as the index says, integer tokens,
    every token id below ``vocab_size`` (when given). DatasetCheckError otherwise."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    try:
        header, lengths, _documents = read_index(idx)
    except IndexFormatError as e:
        raise DatasetCheckError(f"data.paths: {e}. Re-create it with `mod-prep-data`.") from None
    except OSError as e:
        raise DatasetCheckError(f"data.paths: cannot read '{idx}': {e.strerror or e}") from None
    dtype = header.dtype
    if dtype.kind not in "iu":
        raise DatasetCheckError(f"data.paths: '{idx}' stores {dtype} tokens; token ids must be integers.")
    if len(lengths) and int(lengths.min()) < 0:
        raise DatasetCheckError(f"data.paths: '{idx}' has negative sequence lengths: it is damaged.")
    tokens = int(lengths.astype(np.int64).sum())
    expected = tokens * dtype.itemsize
    actual = os.path.getsize(bin_)
    if actual != expected:
        why = ("cut short (an interrupted copy or write?)" if actual < expected else
               "longer than its index describes")
        raise DatasetCheckError(
            f"data.paths: '{bin_}' has {actual} bytes but '{idx}' describes {tokens} {dtype} tokens = {expected} "
            f"bytes: the .bin is {why}, or the .idx belongs to another dataset. Re-create both with "
            f"`mod-prep-data` (they must come from the same run).")
    if vocab_size is not None:
        top = _max_token(bin_, dtype, tokens)
        if top >= vocab_size:
            raise DatasetCheckError(
                f"data.paths: '{bin_}' holds token id {top}, but the tokenizer (data.tokenizer_model) has only "
                f"{vocab_size} ids: the data was tokenized with another (larger) tokenizer. Re-tokenize it with "
                f"`mod-prep-data -t <data.tokenizer_model>` or point data.tokenizer_model at the tokenizer used.")


def documents_end_with(prefix: str, eod: int, documents: int = 64) -> bool:
    """Whether any of the first ``documents`` documents of ``prefix`` ends with token ``eod`` (data
    tokenized with ``mod-prep-data --no-eod`` has no document boundary a mask could follow)."""
    header, lengths, docs = read_index(prefix + ".idx")
    # docs: sequence index where each document starts (megatron's layout, leading 0); a document's
    # last token is the last token of the sequence before the next document starts.
    ends = np.cumsum(lengths.astype(np.int64))
    last_sequences = [int(d) - 1 for d in docs[1:documents + 1] if int(d) > 0]
    if not last_sequences:
        return False
    data = np.memmap(prefix + ".bin", dtype=header.dtype, mode="r", shape=(int(ends[-1]),))
    return any(int(data[ends[i] - 1]) == eod for i in last_sequences if lengths[i] > 0)
