"""megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written without torch.

Byte for byte what ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` writes
(tested against it), so data preparation starts encoding without importing torch or megatron-core
(about 3.6 CPU-seconds). Layout of the .idx file (little-endian)::

    b"MMIDIDX\\x00\\x00"  | <Q version=1 | <B dtype code |
    <Q sequence count N | <Q document-index count D (documents + 1) |
    int32[N] sequence lengths | int64[N] byte offsets into .bin | int64[D] document indices

The .bin file is the sequences' tokens back to back in the dtype. Each document here is one
sequence, so the document indices are 0, 1, ..., N.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from typing import BinaryIO, List, Optional

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: numpy dtype name -> code stored in the .idx header.
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
# DType.optimal_dtype: uint16 below this many token ids, else int32 (megatron's own margin under 65536).
UINT16_VOCAB_LIMIT = 65500


class IndexFormatError(ValueError):
    """A file that is not a readable megatron-core index; the message names it."""


def token_dtype(vocab_size: Optional[int]) -> np.dtype:
    """The token dtype megatron-core's ``DType.optimal_dtype`` picks for this vocabulary size."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < UINT16_VOCAB_LIMIT else np.int32)


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    sequence_count: int
    document_count: int  # entries of the document index (documents + 1)


def read_header(idx_path: str) -> IndexHeader:
    """The header of an .idx file; IndexFormatError if it is not one this code can read."""
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or not head.startswith(INDEX_HEADER):
        raise IndexFormatError(f"'{idx_path}' is not a megatron-core index file (bad header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
    if version != INDEX_VERSION:
        raise IndexFormatError(f"'{idx_path}' has index version {version}; only version {INDEX_VERSION} is supported")
    names = {c: n for n, c in DTYPE_CODES.items()}
    if code not in names:
        raise IndexFormatError(f"'{idx_path}' has an unknown dtype code {code}")
    return IndexHeader(dtype=np.dtype(names[code]), sequence_count=sequences, document_count=documents)


def read_index(idx_path: str):
    """(header, sequence lengths int32[N], document indices int64[D]) of an .idx file."""
    header = read_header(idx_path)
    n, d = header.sequence_count, header.document_count
    expected = _HEADER_BYTES + n * (4 + 8) + d * 8
    actual = os.path.getsize(idx_path)
    if actual < expected:
        raise IndexFormatError(f"'{idx_path}' is truncated: {actual} bytes, its header needs {expected}")
    lengths = np.fromfile(idx_path, dtype="<i4", count=n, offset=_HEADER_BYTES)
    documents = np.fromfile(idx_path, dtype="<i8", count=d, offset=_HEADER_BYTES + n * 12)
    return header, lengths, documents


class IndexedWriter:
    """Writes ``.bin`` as sequences arrive and the ``.idx`` at :meth:`finalize`.

    Only the per-sequence lengths stay in memory (4 bytes per document); tokens go straight to disk.
    """

    def __init__(self, bin_path: str, dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be stored in an indexed dataset")
        self._lengths: List[np.ndarray] = []
        self._doc_ends: List[np.ndarray] = []  # document indices after the leading 0
        self._sequences = 0
        self.tokens = 0
        self._bin: BinaryIO = open(bin_path, "wb")

    @property
    def closed(self) -> bool:
        return self._bin.closed

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents of one sequence each: ``tokens`` back to back, ``lengths`` per document."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths add up to {int(lengths.sum())} tokens but {tokens.size} were given")
        self._bin.write(tokens.tobytes(order="C"))
        self._lengths.append(lengths.astype(np.int32))
        self._doc_ends.append(np.arange(self._sequences + 1, self._sequences + len(lengths) + 1, dtype=np.int64))
        self._sequences += len(lengths)
        self.tokens += tokens.size

    def add_index(self, prefix: str) -> None:
        """Append a whole indexed dataset (as megatron's ``IndexedDatasetBuilder.add_index``)."""
        header, lengths, documents = read_index(prefix + ".idx")
        if header.dtype != self.dtype:
            raise IndexFormatError(f"'{prefix}.idx' holds {header.dtype} tokens, not {self.dtype}")
        self._lengths.append(lengths.astype(np.int32))
        self._doc_ends.append(documents[1:] + self._sequences)
        self._sequences += len(lengths)
        self.tokens += int(lengths.astype(np.int64).sum())
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)

    def close(self) -> None:
        if not self._bin.closed:
            self._bin.close()

    @property
    def sequences(self) -> int:
        return self._sequences

    @property
    def documents(self) -> int:
        return int(sum(len(d) for d in self._doc_ends))

    def finalize(self, idx_path: str) -> None:
        """Close the .bin and write the .idx."""
        self.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_index = np.concatenate([np.zeros(1, np.int64)] + self._doc_ends)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype.name]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(doc_index.astype("<i8").tobytes(order="C"))
