"""Tokenize .txt / .jsonl documents into megatron-core's indexed format (``PREFIX.bin`` + ``PREFIX.idx``).

One sequence per document, the tokenizer's EOS id appended as end-of-document (EOD), every
document ended with ``IndexedDatasetBuilder.end_document()``. Tokens are stored as uint16 when the
vocabulary has fewer than 65500 pieces, else int32 (megatron's ``DType.optimal_dtype``).

Work is split into chunks of about 1 MB of input text that worker processes tokenize
(``Pool.imap``, order preserved); the main process only reads lines and writes results, so the
output is byte-identical for any number of workers. At most ``4 x workers`` chunks are in flight,
so memory stays bounded on corpora of any size. Output goes to ``PREFIX.tmp-<pid>.{bin,idx}`` and
is renamed into place at the end (the .idx last): a crash never leaves a truncated dataset.

Usage::

    mod-prep-data -i 'data/*.jsonl' -t data/tok.model -o data/corpus_text_document [--workers 8]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np

from data_prep._io import DataPrepError, expand_inputs, iter_line_chunks, parse_lines, prepare_output_dir

_MAX_IN_FLIGHT_PER_WORKER = 4


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

    def line(self) -> str:
        rate = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        return (f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens "
                f"({self.dtype}) from {self.input_bytes / 1e6:.2f} MB in {self.seconds:.1f} s ({rate:.1f} MB/s)")


def load_tokenizer_model(path: str):
    """A SentencePieceProcessor, or DataPrepError saying what is wrong with ``path``."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise DataPrepError(f"tokenizer model not found: '{path}' (from {os.getcwd()}); train one with "
                            f"mod-prep-tokenizer or pass the path of an existing .model file")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataPrepError(f"'{path}' is not a readable sentencepiece model: {e}") from None


class _Encoder:
    """Turns a chunk of raw input lines into (flat tokens, per-document lengths, input bytes)."""

    def __init__(self, model_path: str, text_key: str, eod: Optional[int], dtype: str):
        self.sp = load_tokenizer_model(model_path)
        self.text_key, self.eod, self.dtype = text_key, eod, np.dtype(dtype)

    def __call__(self, chunk) -> Tuple[np.ndarray, np.ndarray, int]:
        path, fmt, start, lines, nbytes = chunk
        encoded = self.sp.encode(parse_lines(lines, fmt, self.text_key, path, start), num_threads=1)
        if self.eod is not None:
            for ids in encoded:
                ids.append(self.eod)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths, nbytes


_WORKER_ENCODER: Optional[_Encoder] = None


def _init_worker(*args) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(*args)


def _encode_in_worker(chunk):
    return _WORKER_ENCODER(chunk)


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


def tokenize_corpus(
    inputs,
    tokenizer_model: str,
    output_prefix: str,
    workers: Optional[int] = None,
    text_key: str = "text",
    append_eod: bool = True,
    chunk_bytes: int = 1 << 20,
    progress: Optional[bool] = None,
    start_method: str = "spawn",
) -> TokenizeSummary:
    """Tokenize ``inputs`` (files/globs/directories of .txt/.jsonl[.gz]) into ``output_prefix``.bin/.idx.

    ``workers``: tokenizer processes (default: all cores; 1 tokenizes in this process).
    ``progress``: tqdm bar on stderr; None shows it only when stderr is a terminal.
    ``start_method``: multiprocessing start method of the pool ("spawn" is safe after torch is
    imported; "fork" starts faster). Raises DataPrepError with a clear message for a missing
    tokenizer, missing inputs, an output directory that cannot be created, or an empty corpus.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    t0 = time.perf_counter()
    output_prefix = os.fspath(output_prefix)
    for ext in (".bin", ".idx"):
        if output_prefix.endswith(ext):
            output_prefix = output_prefix[: -len(ext)]
    sp = load_tokenizer_model(tokenizer_model)
    vocab_size = sp.get_piece_size()
    eod = None
    if append_eod:
        eod = sp.eos_id()
        if eod < 0:
            raise DataPrepError(f"tokenizer '{tokenizer_model}' has no EOS token to use as end-of-document; "
                                f"retrain it with mod-prep-tokenizer or pass --no-eod")
    del sp
    files = expand_inputs(inputs)
    prepare_output_dir(output_prefix)
    dtype = DType.optimal_dtype(vocab_size)
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    if progress is None:
        progress = sys.stderr.isatty()

    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = tmp_prefix + ".bin", tmp_prefix + ".idx"
    encoder_args = (os.path.abspath(tokenizer_model), text_key, eod, np.dtype(dtype).name)
    documents = tokens = nbytes_total = 0
    slots = threading.Semaphore(_MAX_IN_FLIGHT_PER_WORKER * workers)
    stop = threading.Event()
    pool = builder = None
    bar = tqdm(total=_input_size(files), unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
               file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    try:
        try:
            builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        except OSError as e:
            raise DataPrepError(f"cannot write '{tmp_bin}': {e.strerror or e}") from None
        chunks = iter_line_chunks(files, chunk_bytes)
        if workers == 1:
            results = map(_Encoder(*encoder_args), chunks)
        else:
            pool = multiprocessing.get_context(start_method).Pool(workers, initializer=_init_worker,
                                                                  initargs=encoder_args)
            results = pool.imap(_encode_in_worker, _bounded(chunks, slots, stop), chunksize=1)
        for flat, lengths, nbytes in results:
            if pool is not None:
                slots.release()
            offset = 0
            for length in lengths.tolist():
                builder.add_item(torch.from_numpy(flat[offset:offset + length]))
                builder.end_document()
                offset += length
            documents += len(lengths)
            tokens += len(flat)
            nbytes_total += nbytes
            bar.update(nbytes)
            bar.set_postfix(docs=documents, tokens=tokens, refresh=False)
        if documents == 0:
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataPrepError(f"empty corpus: no non-blank documents in {shown}")
        if pool is not None:
            pool.close()
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    except BaseException:
        stop.set()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.join()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return TokenizeSummary(output_prefix=output_prefix, documents=documents, tokens=tokens,
                           input_bytes=nbytes_total, seconds=time.perf_counter() - t0,
                           dtype=np.dtype(dtype).name, vocab_size=vocab_size, eod_id=eod, files=files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mod-prep-data",
        description="Tokenize documents into megatron-core indexed files PREFIX.bin/PREFIX.idx "
                    "(one sequence per document, EOS appended as end-of-document).")
    p.add_argument("-i", "--input", dest="inputs", nargs="+", action="extend", required=True, metavar="PATH",
                   help=".txt (one document per line) or .jsonl files (.gz ok), globs or directories")
    p.add_argument("-t", "--tokenizer-model", required=True, help="sentencepiece .model (mod-prep-tokenizer)")
    p.add_argument("-o", "--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("-w", "--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--no-eod", dest="append_eod", action="store_false", help="do not append EOS to documents")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="input text per work item (default: 1 MB)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it is shown only when stderr is a terminal anyway)")
    p.add_argument("--start-method", choices=("spawn", "forkserver", "fork"), default="spawn")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        summary = tokenize_corpus(a.inputs, a.tokenizer_model, a.output_prefix, workers=a.workers,
                                  text_key=a.text_key, append_eod=a.append_eod,
                                  chunk_bytes=max(1, int(a.chunk_mb * (1 << 20))), progress=a.progress,
                                  start_method=a.start_method)
    except DataPrepError as e:
        print(f"mod-prep-data: error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
