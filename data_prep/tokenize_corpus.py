"""Tokenize .txt / .jsonl documents into megatron-core's indexed format (``PREFIX.bin`` + ``PREFIX.idx``).

The tokenizer is a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json`` (or a directory
with one); see :mod:`data_prep.encoders`. One sequence per document, the tokenizer's EOS id
appended as end-of-document (EOD). Tokens are stored as uint16 when the vocabulary has fewer than
65500 ids, else int32 (megatron's ``DType.optimal_dtype``). The files are written by
:mod:`data_prep.indexed_format`, byte for byte what megatron-core's ``IndexedDatasetBuilder``
writes, so this path never imports torch or megatron-core and workers start encoding at once.

Work is split into chunks of about 1 MB of input. For uncompressed files a chunk is a byte range
that the worker reads, parses and encodes itself; the main process only writes results (gzipped
files are read by the main process, which sends lines). Results come back in order
(``Pool.imap``), so the output is byte-identical for any number of workers. At most
``4 x workers`` chunks are in flight, so memory stays bounded on corpora of any size.

``parallel="threads"`` (Hugging Face tokenizers only) encodes each chunk in this process with the
library's own multi-threaded batch encoding instead of worker processes.

Output goes to ``PREFIX.tmp-<pid>.{bin,idx}`` and is renamed into place at the end (the .idx
last): a crash never leaves a truncated dataset.

Usage::

    mod-prep-data -i 'data/*.jsonl' -t data/tok.model -o data/corpus_text_document [--workers 8]
    mod-prep-data -i 'data/*.jsonl' -t data/hf_tok/ -o data/corpus_text_document
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from data_prep.text_check import check_text_files
from data_prep._io import (DataPrepError, expand_inputs, input_format, iter_byte_ranges, iter_line_chunks,
                           line_number_at, parse_lines, prepare_output_dir, read_byte_range)
from data_prep.encoders import TextEncoder, TokenizerKind, eod_id, load_encoder
from data_prep.indexed_format import IndexedWriter, token_dtype

_MAX_IN_FLIGHT_PER_WORKER = 4


class Parallel(str, Enum):
    PROCESSES = "processes"  # worker processes, one encoder thread each
    THREADS = "threads"  # one process, the Hugging Face library's batch encoding on N threads


@dataclass(frozen=True)
class ByteRangeChunk:
    """Lines ``start:end`` (bytes) of an uncompressed file; read by the worker."""

    path: str
    fmt: str
    start: int
    end: int


@dataclass(frozen=True)
class LineChunk:
    """Lines already read by the main process (gzipped input)."""

    path: str
    fmt: str
    first_lineno: int
    lines: List[str]
    nbytes: int


Chunk = Union[ByteRangeChunk, LineChunk]


@dataclass
class TokenizeSummary:
    output_prefix: str
    documents: int
    tokens: int  # including the EOD tokens
    input_bytes: int
    seconds: float
    dtype: str
    vocab_size: int
    eod_id: Optional[int]
    files: List[str]
    tokenizer_kind: str = TokenizerKind.SENTENCEPIECE.value
    first_chunk_seconds: Optional[float] = None  # from the call until the first encoded chunk was written

    def line(self) -> str:
        rate = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        first = "" if self.first_chunk_seconds is None else f"; first chunk after {self.first_chunk_seconds:.2f} s"
        return (f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens "
                f"({self.dtype}) from {self.input_bytes / 1e6:.2f} MB in {self.seconds:.1f} s ({rate:.1f} MB/s{first})")


def iter_chunks(files: List[str], chunk_bytes: int) -> Iterator[Chunk]:
    """The corpus in input order as chunks of about ``chunk_bytes``; never spanning two files."""
    for path in files:
        if path.endswith(".gz"):
            for p, fmt, first, lines, nbytes in iter_line_chunks([path], chunk_bytes):
                yield LineChunk(p, fmt, first, lines, nbytes)
        else:
            fmt = input_format(path)
            for start, end in iter_byte_ranges(path, chunk_bytes):
                yield ByteRangeChunk(path, fmt, start, end)


def chunk_documents(chunk: Chunk, text_key: str) -> Tuple[List[str], int]:
    """(documents, input bytes) of a chunk; errors name the file and line."""
    if isinstance(chunk, LineChunk):
        return parse_lines(chunk.lines, chunk.fmt, text_key, chunk.path, chunk.first_lineno), chunk.nbytes
    lines = read_byte_range(chunk.path, chunk.start, chunk.end)
    try:
        return parse_lines(lines, chunk.fmt, text_key, chunk.path, 1), chunk.end - chunk.start
    except DataPrepError:
        # Only now is the line number worth counting: parse again to raise with the right one.
        parse_lines(lines, chunk.fmt, text_key, chunk.path, line_number_at(chunk.path, chunk.start))
        raise


class ChunkEncoder:
    """Turns a chunk into (tokens back to back, tokens per document, input bytes)."""

    def __init__(self, encoder: TextEncoder, text_key: str, eod: Optional[int], dtype: str):
        self.encoder = encoder
        self.text_key, self.eod, self.dtype = text_key, eod, np.dtype(dtype)

    def __call__(self, chunk: Chunk) -> Tuple[np.ndarray, np.ndarray, int]:
        docs, nbytes = chunk_documents(chunk, self.text_key)
        flat, lengths = self.encoder.encode_flat(docs, self.eod, self.dtype)
        return flat, lengths, nbytes


class _WorkerState:
    """The encoder of this worker process (set once by the pool initializer)."""

    encoder: Optional[ChunkEncoder] = None


def _init_worker(tokenizer_path: str, text_key: str, eod: Optional[int], dtype: str) -> None:
    # A worker is one encoder thread: the workers are the parallelism, not the library's threads.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WorkerState.encoder = ChunkEncoder(load_encoder(tokenizer_path), text_key, eod, dtype)


def _encode_in_worker(chunk: Chunk):
    return _WorkerState.encoder(chunk)


def _bounded(chunks: Iterator, slots: threading.Semaphore, stop: threading.Event) -> Iterator:
    """Yield chunks only while a slot is free (Pool.imap would otherwise read the whole corpus)."""
    for chunk in chunks:
        while not slots.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield chunk


def _input_size(files: List[str]) -> Optional[int]:
    if any(f.endswith(".gz") for f in files):
        return None
    return sum(os.path.getsize(f) for f in files)


def _strip_ext(prefix: str) -> str:
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def default_start_method() -> str:
    """"fork" where it is safe and offered (workers start in milliseconds instead of re-importing),
    else "spawn": after torch is imported (its thread pools do not survive a fork) or off Linux."""
    if sys.platform.startswith("linux") and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def _use_threads(encoder_threads: int) -> None:
    """Let the Hugging Face library's batch encoding use ``encoder_threads`` threads in this process.

    The library reads these when it first encodes in parallel; a caller's own setting wins.
    """
    os.environ.setdefault("RAYON_NUM_THREADS", str(encoder_threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def tokenize_corpus(
    inputs,
    tokenizer_model: str,
    output_prefix: str,
    workers: Optional[int] = None,
    text_key: str = "text",
    append_eod: bool = True,
    chunk_bytes: int = 1 << 20,
    progress: Optional[bool] = None,
    start_method: Optional[str] = None,
    parallel: Union[Parallel, str] = Parallel.PROCESSES,
) -> TokenizeSummary:
    """Tokenize ``inputs`` (files/globs/directories of .txt/.jsonl[.gz]) into ``output_prefix``.bin/.idx.

    ``tokenizer_model``: a sentencepiece ``.model``, a ``tokenizer.json`` or a directory with one.
    ``workers``: encoder processes (or threads, with ``parallel="threads"``); default all cores; 1
    encodes in this process on one thread. ``progress``: tqdm bar on stderr; None shows it only
    when stderr is a terminal. ``start_method``: multiprocessing start method of the pool (default:
:func:`default_start_method`).
    Raises DataPrepError with a clear message for a missing or unreadable tokenizer, missing
    inputs, an output directory that cannot be created, or an empty corpus.
    """
    t0 = time.perf_counter()
    parallel = Parallel(parallel)
    output_prefix = _strip_ext(os.fspath(output_prefix))
    encoder = load_encoder(tokenizer_model)
    if parallel is Parallel.THREADS and encoder.kind is not TokenizerKind.HF:
        raise DataPrepError(f"--parallel threads needs a Hugging Face tokenizer.json; '{tokenizer_model}' is a "
                            f"{encoder.kind.value} model: use --parallel processes")
    vocab_size = encoder.vocab_size
    eod = eod_id(encoder) if append_eod else None
    dtype = token_dtype(vocab_size)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise DataPrepError(f"tokenizer '{tokenizer_model}' has {vocab_size} ids, more than an indexed dataset's "
                            f"largest token dtype ({dtype}, max {np.iinfo(dtype).max}) can hold")
    files = expand_inputs(inputs)
    check_text_files(files)  # binary input is refused, not decoded as U+FFFD (text_check.py)
    prepare_output_dir(output_prefix)
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    if progress is None:
        progress = sys.stderr.isatty()

    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = tmp_prefix + ".bin", tmp_prefix + ".idx"
    encoder_args = (os.path.abspath(encoder.path), text_key, eod, dtype.name)
    nbytes_total = 0
    first_chunk_seconds: Optional[float] = None
    slots = threading.Semaphore(_MAX_IN_FLIGHT_PER_WORKER * workers)
    stop = threading.Event()
    pool = writer = None
    bar = None
    try:
        chunks = iter_chunks(files, chunk_bytes)
        if workers > 1 and parallel is Parallel.PROCESSES:
            # Started before anything else is loaded here: workers encode while the main process sets up.
            pool = multiprocessing.get_context(start_method or default_start_method()).Pool(
                workers, initializer=_init_worker, initargs=encoder_args)
            results = pool.imap(_encode_in_worker, _bounded(chunks, slots, stop), chunksize=1)
        else:
            if parallel is Parallel.THREADS:
                _use_threads(workers)
                encoder.batch_threads = True
            results = map(ChunkEncoder(encoder, text_key, eod, dtype.name), chunks)
        try:
            writer = IndexedWriter(tmp_bin, dtype)
        except OSError as e:
            raise DataPrepError(f"cannot write '{tmp_bin}': {e.strerror or e}") from None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=_input_size(files), unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
                       file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        for flat, lengths, nbytes in results:
            if pool is not None:
                slots.release()
            writer.add_documents(flat, lengths)
            if first_chunk_seconds is None:
                first_chunk_seconds = time.perf_counter() - t0
            nbytes_total += nbytes
            if bar is not None:
                bar.update(nbytes)
                bar.set_postfix(docs=writer.sequences, tokens=writer.tokens, refresh=False)
        if writer.sequences == 0:
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataPrepError(f"empty corpus: no non-blank documents in {shown}")
        if pool is not None:
            pool.close()
        writer.finalize(tmp_idx)
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    except BaseException:
        stop.set()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.join()
        if writer is not None:
            writer.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return TokenizeSummary(output_prefix=output_prefix, documents=writer.sequences, tokens=writer.tokens,
                           input_bytes=nbytes_total, seconds=time.perf_counter() - t0, dtype=dtype.name,
                           vocab_size=vocab_size, eod_id=eod, files=files, tokenizer_kind=encoder.kind.value,
                           first_chunk_seconds=first_chunk_seconds)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mod-prep-data",
        description="Tokenize documents into megatron-core indexed files PREFIX.bin/PREFIX.idx "
                    "(one sequence per document, EOS appended as end-of-document).")
    p.add_argument("-i", "--input", dest="inputs", nargs="+", action="extend", required=True, metavar="PATH",
                   help=".txt (one document per line) or .jsonl files (.gz ok), globs or directories")
    p.add_argument("-t", "--tokenizer-model", required=True,
                   help="sentencepiece .model, Hugging Face tokenizer.json, or a directory with a tokenizer.json")
    p.add_argument("-o", "--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("-w", "--workers", type=int, default=None,
                   help="encoder processes (threads with --parallel threads); default: all cores")
    p.add_argument("--parallel", choices=[m.value for m in Parallel], default=Parallel.PROCESSES.value,
                   help="processes (default): worker processes; threads: the Hugging Face library's batch "
                        "encoding in one process (tokenizer.json only)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--no-eod", dest="append_eod", action="store_false", help="do not append EOS to documents")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="input text per work item (default: 1 MB)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it is shown only when stderr is a terminal anyway)")
    p.add_argument("--start-method", choices=("spawn", "forkserver", "fork"), default=None,
                   help="worker start method (default: fork on Linux, where this process has no torch)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        summary = tokenize_corpus(a.inputs, a.tokenizer_model, a.output_prefix, workers=a.workers,
                                  text_key=a.text_key, append_eod=a.append_eod,
                                  chunk_bytes=max(1, int(a.chunk_mb * (1 << 20))), progress=a.progress,
                                  start_method=a.start_method, parallel=a.parallel)
    except DataPrepError as e:
        print(f"mod-prep-data: error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
