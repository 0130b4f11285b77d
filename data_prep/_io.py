"""Input handling shared by the data_prep scripts: file/glob expansion and document reading.

Formats (chosen by file name; a trailing ``.gz`` is decompressed on the fly):

* ``.txt``: every non-blank line is one document (the line break is not part of it).
* ``.jsonl``: one JSON object per line; the document is its ``text_key`` field (a string). Blank
  lines are skipped; a line that is not JSON or lacks the field is an error naming file and line.

No torch or megatron import here: worker processes import this module.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import IO, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

FORMATS = (".txt", ".jsonl")
_GLOB_CHARS = set("*?[")


class DataPrepError(RuntimeError):
    """A user-facing error: the message says what is wrong and what to change."""


def input_format(path: str) -> str:
    """``"txt"`` or ``"jsonl"`` from the file name (``.gz`` allowed), else DataPrepError."""
    name = path[:-3] if path.endswith(".gz") else path
    for ext in FORMATS:
        if name.endswith(ext):
            return ext[1:]
    raise DataPrepError(f"unsupported input file '{path}': expected a name ending in "
                        f"{', '.join(FORMATS)} (optionally followed by .gz)")


def expand_inputs(inputs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """Files named by ``inputs`` (paths, globs incl. ``**``, or directories), in the given order.

    Globs and directories expand in sorted order; duplicates are kept once (first occurrence).
    Raises DataPrepError for a glob that matches nothing, a missing path, an empty directory, an
    unsupported file type, or no inputs at all.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: List[str] = []
    for item in inputs:
        item = os.fspath(item)
        if _GLOB_CHARS & set(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataPrepError(f"no input files match the glob '{item}' (from {os.getcwd()})")
            found = matches
        elif os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item) for f in names
                           if _is_supported(f))
            if not found:
                raise DataPrepError(f"input directory '{item}' contains no {'/'.join(FORMATS)} files")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise DataPrepError(f"input file not found: '{item}' (from {os.getcwd()})")
        for f in found:
            input_format(f)  # fail early on unsupported types
            if f not in files:
                files.append(f)
    if not files:
        raise DataPrepError("no input files given")
    return files


def _is_supported(name: str) -> bool:
    try:
        input_format(name)
        return True
    except DataPrepError:
        return False


def open_text(path: str) -> IO[str]:
    """Open a (possibly gzipped) UTF-8 text file; bad bytes become U+FFFD rather than failing."""
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="\n")
    return open(path, "r", encoding="utf-8", errors="replace", newline="\n")


def parse_lines(lines: Iterable[str], fmt: str, text_key: str, path: str, first_lineno: int) -> List[str]:
    """Documents in raw input ``lines`` (of one file, starting at line ``first_lineno``).

    Blank (whitespace-only) documents are dropped: they would hold nothing but the EOD token.
    """
    docs: List[str] = []
    for n, line in enumerate(lines, start=first_lineno):
        if fmt == "txt":
            text = line.rstrip("\r\n")
        else:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataPrepError(f"{path}:{n}: not a JSON object ({e.msg}); .jsonl inputs need one "
                                    f"JSON object per line") from None
            if not isinstance(obj, dict) or text_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataPrepError(f"{path}:{n}: no '{text_key}' field (found: {keys}); pass "
                                    f"--text-key with the field that holds the document")
            text = obj[text_key]
            if not isinstance(text, str):
                raise DataPrepError(f"{path}:{n}: field '{text_key}' is a {type(text).__name__}, not a string")
        if text.strip():
            docs.append(text)
    return docs


def iter_line_chunks(files: Sequence[str], chunk_bytes: int = 1 << 20):
    """``(path, fmt, first_lineno, lines, nbytes)`` chunks of about ``chunk_bytes`` raw text each.

    Chunks never span two files; concatenating their documents gives the documents in input order.
    """
    for path in files:
        fmt = input_format(path)
        with open_text(path) as f:
            lines: List[str] = []
            size, start, lineno = 0, 1, 0
            for lineno, line in enumerate(f, start=1):
                lines.append(line)
                size += len(line.encode("utf-8"))
                if size >= chunk_bytes:
                    yield path, fmt, start, lines, size
                    lines, size, start = [], 0, lineno + 1
            if lines:
                yield path, fmt, start, lines, size


def iter_documents(inputs, text_key: str = "text", files: Optional[List[str]] = None) -> Iterator[str]:
    """All documents of ``inputs`` in order (see the module docstring for the formats)."""
    for path, fmt, start, lines, _ in iter_line_chunks(files if files is not None else expand_inputs(inputs)):
        yield from parse_lines(lines, fmt, text_key, path, start)


def prepare_output_dir(output_prefix: str) -> str:
    """Create the directory of ``output_prefix``; DataPrepError (saying why) if that fails."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataPrepError(f"cannot create output directory '{out_dir}': {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK):
        raise DataPrepError(f"output directory '{out_dir}' is not writable")
    return out_dir


def iter_byte_ranges(path: str, chunk_bytes: int = 1 << 20) -> Iterator[Tuple[int, int]]:
    """``(start, end)`` byte ranges of about ``chunk_bytes`` covering an uncompressed file, cut after a
    newline, so a worker can read and parse its own range: the main process reads no text."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size) - 1)
            f.readline()  # to the end of the line that holds the last byte of the budget
            end = f.tell()
            yield start, end
            start = end


def read_byte_range(path: str, start: int, end: int) -> List[str]:
    """The lines of ``path[start:end]`` (a range from :func:`iter_byte_ranges`), decoded as :func:`open_text` does.

    Ranges end after a newline byte, which never occurs inside a UTF-8 sequence, so decoding each
    range alone gives the same text as decoding the whole file.
    """
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return _split_on_newline(data.decode("utf-8", errors="replace"))


def _split_on_newline(text: str) -> List[str]:
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def line_number_at(path: str, offset: int) -> int:
    """The 1-based line number of the line that starts at byte ``offset`` (for error messages)."""
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1
