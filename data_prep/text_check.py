"""Is an input file text? Checked before tokenizing, so random or binary bytes are refused.

Decoding replaces bad bytes with U+FFFD (one stray byte in a large corpus must not stop a job),
which let a binary file through as "text". Here windows of each input (start, middle, end; the
start of a .gz) are checked: a NUL byte, or invalid UTF-8 above a small tolerance, is an error
naming the file and the offset of the first bad byte.
"""

from __future__ import annotations

import gzip
import os
from typing import List, Sequence, Tuple

from data_prep._io import DataPrepError

WINDOW_BYTES = 1 << 20
# Invalid UTF-8 sequences allowed per sampled byte (a few stray bytes in real corpora), plus a
# few for windows cut in the middle of a multi-byte character.
MAX_INVALID_FRACTION = 1e-3
BOUNDARY_SLACK = 8


def _windows(path: str) -> List[Tuple[int, bytes]]:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return [(0, f.read(4 * WINDOW_BYTES))]
    size = os.path.getsize(path)
    starts = sorted({0, max(0, size // 2 - WINDOW_BYTES // 2), max(0, size - WINDOW_BYTES)})
    out = []
    with open(path, "rb") as f:
        for start in starts:
            f.seek(start)
            out.append((start, f.read(WINDOW_BYTES)))
    return out


def _invalid_utf8(data: bytes) -> Tuple[int, int]:
    """(number of invalid sequences, offset of the first) in ``data``: one decode pass."""
    try:
        data.decode("utf-8")
        return 0, -1
    except UnicodeDecodeError as e:
        first = e.start
    # Each invalid sequence becomes one U+FFFD; real U+FFFD characters in the text are not errors.
    count = data.decode("utf-8", errors="replace").count("\ufffd") - data.count("\ufffd".encode("utf-8"))
    return count, first


def check_text_file(path: str) -> None:
    """DataPrepError unless ``path`` looks like UTF-8 text."""
    sampled, invalid, first_bad = 0, 0, -1
    for start, data in _windows(path):
        nul = data.find(b"\x00")
        if nul >= 0:
            where = f"byte {start + nul}" if not path.endswith(".gz") else f"decompressed byte {nul}"
            raise DataPrepError(f"input '{path}' is not text: it holds a NUL byte (at {where}). Inputs must be "
                                f"UTF-8 .txt/.jsonl files (UTF-16 text holds NULs too: convert it to UTF-8).")
        n, first = _invalid_utf8(data)
        if n and first_bad < 0:
            first_bad = start + first
        sampled += len(data)
        invalid += n
    if invalid > BOUNDARY_SLACK + MAX_INVALID_FRACTION * sampled:
        raise DataPrepError(f"input '{path}' is not UTF-8 text: {invalid} invalid UTF-8 sequences in the "
                            f"{sampled} bytes checked (the first at byte {first_bad}; at most "
                            f"{MAX_INVALID_FRACTION:.1%} are tolerated). Convert it to UTF-8 or leave it out.")


def check_text_files(files: Sequence[str]) -> None:
    for path in files:
        check_text_file(path)
