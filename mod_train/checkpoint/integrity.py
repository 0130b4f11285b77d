"""Self-verifying checkpoints: every file's size and checksum, listed in complete.json, checked
before a checkpoint is trusted.

``manifest(dir)`` is computed once, by rank 0 over the fully written staging directory just
before the commit (layout.py), so the numbers describe exactly the bytes that were published.
``verify(dir, record)`` re-reads every listed file and returns a :class:`Verdict`; a checkpoint
that fails is marked with ``BAD_MARKER`` (a small JSON file inside it naming the file and the
problem) and never deleted: layout.py skips a marked checkpoint when it looks for one to resume
and never prunes it, so the evidence stays for a human.

Checksum: xxh3-128 (xxhash, several GB/s per core) streamed in 4 MiB chunks; blake2b from the
standard library where xxhash is not installed. The algorithm is recorded next to the sums, so
either reads the other's checkpoints. Checkpoints written before this existed have no ``files``
entry: they load as "unverified" with a one-line warning.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

__all__ = ["FILES_KEY", "ALGORITHM_KEY", "BAD_MARKER", "Status", "Verdict", "file_checksum", "manifest",
           "verify", "mark_bad", "bad_reason", "has_manifest"]

FILES_KEY = "files"  # complete.json: {relative path: {"size": bytes, "checksum": hex}}
ALGORITHM_KEY = "checksum_algorithm"
BAD_MARKER = "BAD_CHECKPOINT.json"
_COMPLETE_FILE = "complete.json"  # layout.py's name; the record cannot list itself
_CHUNK = 4 << 20

PathLike = Union[str, os.PathLike]


def _hashers() -> Dict[str, Callable[[], object]]:
    hashers: Dict[str, Callable[[], object]] = {"blake2b": lambda: hashlib.blake2b(digest_size=16)}
    try:
        import xxhash

        hashers["xxh3_128"] = xxhash.xxh3_128
    except ImportError:  # optional speed-up; blake2b is always there
        pass
    return hashers


def default_algorithm() -> str:
    return "xxh3_128" if "xxh3_128" in _hashers() else "blake2b"


def file_checksum(path: PathLike, algorithm: str) -> str:
    """Hex digest of the file's bytes, read in 4 MiB chunks (memory stays flat for GB files)."""
    hasher = _hashers()[algorithm]()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            hasher.update(block)
    return hasher.hexdigest()


def manifest(directory: PathLike, algorithm: Optional[str] = None) -> dict:
    """``{"checksum_algorithm": ..., "files": {relpath: {"size", "checksum"}}}`` for every regular
    file under ``directory`` except complete.json and a bad marker."""
    root = Path(directory)
    algorithm = algorithm or default_algorithm()
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in (_COMPLETE_FILE, BAD_MARKER) or path.is_symlink():
                continue
            files[rel] = {"size": path.stat().st_size, "checksum": file_checksum(path, algorithm)}
    return {ALGORITHM_KEY: algorithm, FILES_KEY: files}


class Status(str, enum.Enum):
    GOOD = "good"  # every listed file has its recorded size and checksum
    UNVERIFIED = "unverified"  # written before checksums existed: nothing to compare
    BAD = "bad"  # a listed file is missing, has another size or another checksum


@dataclass(frozen=True)
class Verdict:
    status: Status
    problem: Optional[str] = None  # for BAD: which file and how it differs
    files: int = 0  # files checked

    @property
    def usable(self) -> bool:
        return self.status is not Status.BAD


def has_manifest(record: Mapping) -> bool:
    return isinstance(record.get(FILES_KEY), dict)


def verify(directory: PathLike, record: Mapping) -> Verdict:
    """Check every file listed in ``record`` (the parsed complete.json) against the disk.

    Sizes first for all files (a truncation is found without reading anything), then checksums.
    """
    root = Path(directory)
    if not has_manifest(record):
        return Verdict(Status.UNVERIFIED)
    algorithm = record.get(ALGORITHM_KEY)
    if algorithm not in _hashers():
        return Verdict(Status.BAD, f"{root / _COMPLETE_FILE} names checksum algorithm {algorithm!r}, which this "
                                   f"installation cannot compute (pip install xxhash)")
    files = record[FILES_KEY]
    for rel, want in files.items():
        path = root / rel
        try:
            size = path.stat().st_size
        except OSError:
            return Verdict(Status.BAD, f"{path} is missing")
        if size != want.get("size"):
            return Verdict(Status.BAD, f"{path} is {size} bytes, complete.json says {want.get('size')} (truncated "
                                       f"or overwritten)")
    for rel, want in files.items():
        path = root / rel
        try:
            got = file_checksum(path, algorithm)
        except OSError as e:
            return Verdict(Status.BAD, f"{path} cannot be read: {e}")
        if got != want.get("checksum"):
            return Verdict(Status.BAD, f"{path} has {algorithm} checksum {got}, complete.json says "
                                       f"{want.get('checksum')} (its bytes changed after the save)")
    return Verdict(Status.GOOD, files=len(files))


def mark_bad(directory: PathLike, problem: str) -> Path:
    """Write ``<directory>/BAD_CHECKPOINT.json`` (atomically); the checkpoint itself is kept."""
    import time

    marker = Path(directory) / BAD_MARKER
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"problem": problem, "marked_at_unix": time.time()}, indent=2) + "\n")
    os.replace(tmp, marker)
    return marker


def bad_reason(directory: PathLike) -> Optional[str]:
    """The problem recorded in the bad marker, or None when the checkpoint is not marked bad."""
    marker = Path(directory) / BAD_MARKER
    if not marker.exists():
        return None
    try:
        return str(json.loads(marker.read_text()).get("problem", "marked bad"))
    except (OSError, ValueError):
        return "marked bad"
