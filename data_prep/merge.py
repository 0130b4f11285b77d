"""Merge indexed-dataset shards (``.bin/.idx`` pairs, e.g. from a Slurm array) into one.

Shards are concatenated in the order given (globs expand sorted), as megatron-core's
``IndexedDatasetBuilder.add_index`` does (here by :mod:`data_prep.indexed_format`, without torch or
megatron-core): merging the shards of a corpus gives exactly the files that
tokenizing the whole corpus in one go would. All shards must have the same token dtype. Each
shard's .bin size is checked against its .idx. Output is written to a temporary name and renamed
into place (the .idx last).

Usage::

    mod-prep-merge -i 'data/shard_*' -o data/corpus_text_document
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np

from data_prep._io import DataPrepError, prepare_output_dir
from data_prep.indexed_format import IndexedWriter, IndexFormatError, read_header


@dataclass
class MergeSummary:
    output_prefix: str
    shards: List[str]
    sequences: int
    documents: int
    tokens: int
    dtype: str
    seconds: float


def _strip_ext(path: str) -> str:
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def expand_shards(shards: Union[str, Sequence[str]]) -> List[str]:
    """Shard prefixes from prefixes, ``.bin``/``.idx`` paths, or globs over either (sorted, deduplicated)."""
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    prefixes: List[str] = []
    for item in shards:
        item = os.fspath(item)
        if set("*?[") & set(item):
            # ".tmp-<pid>" files are unfinished outputs of a running or crashed job: never shards.
            matches = sorted({_strip_ext(p) for p in glob.glob(item, recursive=True)
                              if p.endswith((".bin", ".idx")) and ".tmp-" not in os.path.basename(p)})
            if not matches:
                raise DataPrepError(f"no shards (.bin/.idx files) match the glob '{item}' (from {os.getcwd()})")
        else:
            matches = [_strip_ext(item)]
        for prefix in matches:
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            if missing:
                raise DataPrepError(f"shard '{prefix}' is incomplete: {', '.join(missing)} not found")
            if prefix not in prefixes:
                prefixes.append(prefix)
    if not prefixes:
        raise DataPrepError("no shards given")
    return prefixes


def read_dtype(prefix: str) -> np.dtype:
    """The numpy token dtype recorded in ``prefix.idx`` (DataPrepError if it is not an index file)."""
    try:
        return read_header(prefix + ".idx").dtype
    except IndexFormatError as e:
        raise DataPrepError(str(e)) from None


def merge_shards(shards, output_prefix: str) -> MergeSummary:
    """Concatenate the shards into ``output_prefix``.bin/.idx; see the module docstring."""
    t0 = time.perf_counter()
    output_prefix = _strip_ext(os.fspath(output_prefix))
    prefixes = expand_shards(shards)
    out_abs = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise DataPrepError(f"the output '{output_prefix}' is also one of the shards; choose another output prefix")
    dtypes = {p: read_dtype(p) for p in prefixes}
    dtype = dtypes[prefixes[0]]
    odd = [f"{p} ({d.name})" for p, d in dtypes.items() if d != dtype]
    if odd:
        raise DataPrepError(f"shards have different token dtypes: {prefixes[0]} is {dtype.name} but "
                            f"{', '.join(odd)}; tokenize all shards with the same tokenizer")
    prepare_output_dir(output_prefix)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = tmp_prefix + ".bin", tmp_prefix + ".idx"
    writer = None
    try:
        writer = IndexedWriter(tmp_bin, dtype)
        for prefix in prefixes:
            before = writer.tokens
            try:
                writer.add_index(prefix)
            except IndexFormatError as e:
                raise DataPrepError(f"shard '{prefix}': {e}") from None
            expected = (writer.tokens - before) * dtype.itemsize
            actual = os.path.getsize(prefix + ".bin")
            if actual != expected:
                raise DataPrepError(f"shard '{prefix}' is inconsistent: its .idx describes {expected} bytes of "
                                    f"tokens but its .bin has {actual}; re-create that shard")
        tokens, sequences, documents = writer.tokens, writer.sequences, writer.documents
        writer.finalize(tmp_idx)
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    finally:
        if writer is not None:
            writer.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return MergeSummary(output_prefix=output_prefix, shards=prefixes, sequences=sequences, documents=documents,
                        tokens=tokens, dtype=dtype.name, seconds=time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mod-prep-merge",
                                description="Merge megatron-core indexed-dataset shards into one .bin/.idx pair.")
    p.add_argument("-i", "--input", dest="shards", nargs="+", action="extend", required=True, metavar="SHARD",
                   help="shard prefixes, .bin/.idx paths, or globs (merged in the order given; globs sorted)")
    p.add_argument("-o", "--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        s = merge_shards(a.shards, a.output_prefix)
    except DataPrepError as e:
        print(f"mod-prep-merge: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {s.output_prefix}.bin/.idx: {len(s.shards)} shards, {s.documents} documents, "
          f"{s.tokens} tokens ({s.dtype}) in {s.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
