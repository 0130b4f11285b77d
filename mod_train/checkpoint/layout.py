"""On-disk checkpoint layout and crash-safe commit, independent of what a checkpoint contains.

Layout under the checkpoint root::

    iter_0000050/              a complete checkpoint (always holds complete.json)
    iter_0000100/
    latest                     "iter_0000100": the directory name of the newest complete checkpoint
    .staging_iter_0000150/     a save in progress; every rank writes here, never read on resume
    .replaced_iter_0000100/    only while re-saving an existing step (see ``commit``)
    .deleting_iter_0000050/    only while pruning

Invariant: a directory named ``iter_*`` only ever appears by renaming a fully written and fsynced
staging directory, and disappears only by being renamed away first. So after a crash at any point
(kill -9, power loss) ``find_latest`` still returns a checkpoint whose files are all intact.

Only rank 0 calls the mutating methods (``begin``, ``commit``, ``prune``, ``clean_stale_staging``);
the caller places the barriers (all ranks done writing before ``commit``; ``begin`` before writes).
Every rank may call the read-only ones (``find_latest``, ``resolve_resume``, ``list_complete``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, Union

from mod_train.checkpoint import integrity

log = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"
LATEST_FILE = "latest"
_ITER_PREFIX = "iter_"
_STAGING_PREFIX = ".staging_"
_REPLACED_PREFIX = ".replaced_"
_DELETING_PREFIX = ".deleting_"
# Seven digits like Megatron's iter_0000100; larger steps simply get more digits.
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
# Keys commit() writes into complete.json itself; metadata may not override them.
_RESERVED_KEYS = ("step", "committed_at", "committed_at_unix")


def iter_name(step: int) -> str:
    """``iter_0000123``: the directory name of the checkpoint for ``step``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"{_ITER_PREFIX}{step:07d}"


def _parse_iter_name(name: str) -> Optional[int]:
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


def read_metadata(ckpt_dir: Union[str, os.PathLike]) -> dict:
    """The contents of ``<ckpt_dir>/complete.json`` (metadata passed to ``commit`` + step, time).

    Raises OSError / ValueError if it is missing or unreadable.
    """
    with open(Path(ckpt_dir) / COMPLETE_FILE, "r", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{Path(ckpt_dir) / COMPLETE_FILE} does not hold a JSON object")
    return data


def _is_complete(ckpt_dir: Path, step: int) -> bool:
    # Parsing (not just stat-ing) complete.json also rejects a marker truncated by a filesystem
    # that did not honour fsync; the step check rejects a directory renamed by hand.
    try:
        data = read_metadata(ckpt_dir)
    except (OSError, ValueError):
        return False
    return data.get("step") == step


def _is_usable(ckpt_dir: Path, step: int) -> bool:
    """Complete and not marked bad by a failed verification (integrity.py)."""
    return _is_complete(ckpt_dir, step) and integrity.bad_reason(ckpt_dir) is None


def _has_manifest(ckpt_dir: Path) -> bool:
    try:
        return integrity.has_manifest(read_metadata(ckpt_dir))
    except (OSError, ValueError):
        return False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems refuse fsync on a directory; the rename is then as durable as it gets.
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so the rename publishes durable data."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointDir:
    """The checkpoint root directory: names, atomic commit, latest lookup, pruning."""

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        self.root = Path(root)

    # ---- names ---------------------------------------------------------------------------

    def final_dir(self, step: int) -> Path:
        """``<root>/iter_<step:07d>``: where the checkpoint for ``step`` lives once committed."""
        return self.root / iter_name(step)

    def staging_dir(self, step: int) -> Path:
        """``<root>/.staging_iter_<step:07d>``: where all ranks write before ``commit``.

        Deterministic (no uuid) so every rank computes the same path without communicating.
        """
        return self.root / f"{_STAGING_PREFIX}{iter_name(step)}"

    def _replaced_dir(self, step: int) -> Path:
        return self.root / f"{_REPLACED_PREFIX}{iter_name(step)}"

    def _deleting_dir(self, name: str) -> Path:
        return self.root / f"{_DELETING_PREFIX}{name}"

    # ---- save ----------------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """Create an empty staging directory for ``step`` (rank 0, before the other ranks write).

        A stale staging directory for the same step (from a crashed save) is removed first, so
        no file from an earlier attempt can leak into this checkpoint.
        """
        staging = self.staging_dir(step)
        self.root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        return staging

    def commit(self, step: int, metadata: Mapping[str, Any], keep_last: int = 0) -> Path:
        """Publish the staging directory of ``step`` as ``iter_<step>`` and point ``latest`` at it.

        Order (each step durable before the next): complete.json written + everything fsynced ->
        an existing ``iter_<step>`` renamed aside -> staging renamed to ``iter_<step>`` -> root
        fsynced -> ``latest`` replaced atomically -> aside copy removed -> prune to ``keep_last``
        complete checkpoints (``keep_last <= 0``: keep all). Returns the final directory.
        """
        staging = self.staging_dir(step)
        if not staging.is_dir():
            raise FileNotFoundError(
                f"no staging directory {staging}: call begin({step}) before writing the checkpoint"
            )
        clash = sorted(k for k in _RESERVED_KEYS if k in metadata and k != "step")
        if clash or metadata.get("step", step) != step:
            raise ValueError(f"metadata may not set {clash or ['step']}: commit() writes them")
        now = time.time()
        record = {
            **metadata,
            "step": step,
            "committed_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "committed_at_unix": now,
        }
        # Every file's size and checksum, read back once after all ranks wrote (the caller's
        # barrier), so a later verify() compares against exactly the bytes being published.
        record.update(integrity.manifest(staging))
        # Serialize before touching the disk: unserializable metadata must not half-commit.
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"

        _write_durable(staging / COMPLETE_FILE, text)
        _fsync_tree(staging)

        final = self.final_dir(step)
        self._move_existing_aside(step)
        os.rename(staging, final)
        _fsync_path(self.root)
        self._write_latest(final.name)
        aside = self._replaced_dir(step)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        if keep_last > 0:
            self.prune(keep_last)
        return final

    def _move_existing_aside(self, step: int) -> None:
        # rename(2) cannot replace a non-empty directory, and deleting the old iter_<step> first
        # could destroy the only complete checkpoint. Renaming it aside keeps it findable by
        # find_latest (see _candidates) until the new one is in place.
        final, aside = self.final_dir(step), self._replaced_dir(step)
        if not final.exists():
            return
        if integrity.bad_reason(final) is not None:
            # A checkpoint that failed verification is evidence: keep it under a name no lookup
            # or prune matches, instead of deleting it with the aside copy.
            os.rename(final, self.root / f"bad_{final.name}_{int(time.time())}")
            _fsync_path(self.root)
            return
        if aside.exists():
            # Leftover of an earlier interrupted re-save: keep whichever copy is complete.
            if _is_complete(final, step):
                shutil.rmtree(aside)
            else:
                shutil.rmtree(final)
                return
        os.rename(final, aside)
        _fsync_path(self.root)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f"{LATEST_FILE}.tmp"
        _write_durable(tmp, name + "\n")
        os.replace(tmp, self.root / LATEST_FILE)
        _fsync_path(self.root)

    def prune(self, keep_last: int) -> List[Path]:
        """Delete complete checkpoints beyond the ``keep_last`` highest steps; returns the removed.

        The checkpoint ``latest`` points to is always kept, even when a resume from an older
        checkpoint made it lower than others. ``keep_last <= 0`` keeps everything. Failures are
        logged, not raised: the new checkpoint is already committed.
        """
        if keep_last <= 0:
            return []
        complete = self.list_complete()  # checkpoints marked bad are not listed: never pruned
        keep = {p for _, p in complete[-keep_last:]}
        # Never prune the newest checkpoint with checksums while every kept one is unverified.
        verified = [p for _, p in complete if _has_manifest(p)]
        if verified and not any(_has_manifest(p) for p in keep):
            keep.add(verified[-1])
        latest = self._read_latest()
        if latest is not None:
            keep.add(latest[1])
        removed = []
        for _step, path in complete:
            if path in keep or not path.name.startswith(_ITER_PREFIX):
                continue
            doomed = self._deleting_dir(path.name)
            try:
                if doomed.exists():
                    shutil.rmtree(doomed)
                # Rename first so a crash mid-delete never leaves a half-deleted iter_* behind.
                os.rename(path, doomed)
                shutil.rmtree(doomed)
                removed.append(path)
            except OSError as e:
                log.warning("could not prune checkpoint %s: %s", path, e)
        return removed

    def clean_stale_staging(self) -> List[Path]:
        """Remove leftovers of interrupted saves/prunes (rank 0, at startup, no save running).

        Also resolves an interrupted re-save: a ``.replaced_iter_*`` copy is restored when its
        ``iter_*`` is missing or incomplete, else deleted. Returns the paths removed.
        """
        removed: List[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(_STAGING_PREFIX) or name.startswith(_DELETING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            elif name == f"{LATEST_FILE}.tmp":
                entry.unlink(missing_ok=True)
                removed.append(entry)
            elif name.startswith(_REPLACED_PREFIX):
                step = _parse_iter_name(name[len(_REPLACED_PREFIX):])
                if step is None:
                    continue
                final = self.final_dir(step)
                if _is_complete(final, step) or not _is_complete(entry, step):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                else:
                    if final.exists():
                        shutil.rmtree(final)
                        removed.append(final)
                    os.rename(entry, final)
                    _fsync_path(self.root)
        return removed

    # ---- lookup --------------------------------------------------------------------------

    def _candidates(self) -> dict:
        """step -> directory for every complete checkpoint, ``iter_*`` preferred over aside."""
        found: dict = {}
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            name = entry.name
            is_aside = name.startswith(_REPLACED_PREFIX)
            step = _parse_iter_name(name[len(_REPLACED_PREFIX):] if is_aside else name)
            if step is None or not entry.is_dir() or not _is_usable(entry, step):
                continue
            if step not in found or not is_aside:
                found[step] = entry
        return found

    def list_complete(self) -> List[Tuple[int, Path]]:
        """All complete checkpoints as (step, dir), ascending by step; staging dirs ignored."""
        return sorted(self._candidates().items())

    def _read_latest(self) -> Optional[Tuple[int, Path]]:
        try:
            name = (self.root / LATEST_FILE).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None
        step = _parse_iter_name(name)  # also rejects paths: latest may only name a sibling
        if step is None:
            return None
        path = self.root / name
        if _is_usable(path, step):
            return step, path
        aside = self._replaced_dir(step)  # crash in the middle of re-saving that step
        if _is_usable(aside, step):
            return step, aside
        return None

    def find_latest(self) -> Optional[Tuple[int, Path]]:
        """(step, dir) of the checkpoint to resume from, or None if there is none.

        ``latest`` wins when it names a complete checkpoint (after resuming from an older one it
        may deliberately not be the highest step); if it is missing, corrupt or names an
        incomplete directory, the highest complete ``iter_*`` is used instead.
        """
        latest = self._read_latest()
        if latest is not None:
            return latest
        complete = self.list_complete()
        if (self.root / LATEST_FILE).exists():
            log.warning(
                "%s is missing, corrupt or names an incomplete checkpoint; falling back to %s",
                self.root / LATEST_FILE, complete[-1][1] if complete else "no checkpoint",
            )
        return complete[-1] if complete else None

    def find_latest_verified(self) -> Optional[Tuple[int, Path]]:
        """``find_latest``, after checking every file's size and checksum: a checkpoint that fails
        is marked bad (kept, named in a warning) and the next newest is tried. Rank 0 only (it
        writes the marker); a checkpoint without checksums is returned with a one-line warning."""
        tried: set = set()
        while True:
            found = self.find_latest()
            if found is not None and found[1] in tried:  # its marker could not be written
                rest = [c for c in reversed(self.list_complete()) if c[1] not in tried]
                found = rest[0] if rest else None
            if found is None:
                return None
            tried.add(found[1])
            verdict = self.verify(found[1])
            if verdict.usable:
                return found
            log.warning("checkpoint %s is damaged: %s; marked bad (%s), falling back to the previous one",
                        found[1], verdict.problem, integrity.BAD_MARKER)

    def verify(self, ckpt_dir: Path) -> integrity.Verdict:
        """Verify ``ckpt_dir`` against its complete.json; mark it bad (never delete it) on a mismatch."""
        try:
            record = read_metadata(ckpt_dir)
        except (OSError, ValueError) as e:
            verdict = integrity.Verdict(integrity.Status.BAD, f"{Path(ckpt_dir) / COMPLETE_FILE} is unreadable: {e}")
        else:
            verdict = integrity.verify(ckpt_dir, record)
        if verdict.status is integrity.Status.BAD:
            try:
                integrity.mark_bad(ckpt_dir, verdict.problem or "damaged")
            except OSError as e:  # read-only storage: still skipped for this resume
                log.warning("could not mark %s bad: %s", ckpt_dir, e)
        elif verdict.status is integrity.Status.UNVERIFIED:
            log.warning("checkpoint %s has no checksums (written before they existed): loaded unverified", ckpt_dir)
        return verdict

    def resolve_resume(self, resume: Optional[str], verify: bool = False) -> Optional[Path]:
        """The checkpoint directory to load for ``checkpoint.resume``.

        ``"auto"``: the latest complete checkpoint, or None if there is none. ``"none"`` (or
        None): None. Anything else is a path to a checkpoint directory (absolute, relative to the
        working directory, or a name inside the root such as ``iter_0000100``); it must hold
        complete.json, else ValueError says why and lists the available checkpoints.
        """
        if resume is None:
            return None
        key = resume.strip()
        if key.lower() == "none":
            return None
        if key.lower() == "auto":
            found = self.find_latest_verified() if verify else self.find_latest()
            return found[1] if found else None
        if not key:
            raise ValueError(
                "checkpoint.resume is empty: use 'auto', 'none' or a checkpoint directory. "
                + self._available_text()
            )
        path = Path(key).expanduser()
        if not path.exists() and not path.is_absolute() and (self.root / path).exists():
            path = self.root / path
        problem = self._problem_with(path)
        if problem is None and verify:
            verdict = self.verify(path)
            problem = None if verdict.usable else f"is damaged: {verdict.problem} (marked bad)"
        if problem is None:
            return path
        raise ValueError(
            f"checkpoint.resume={resume!r}: {path} {problem}. " + self._available_text(path)
        )

    def _problem_with(self, path: Path) -> Optional[str]:
        if not path.exists():
            return "does not exist"
        if not path.is_dir():
            return "is not a directory"
        if path.name.startswith(_STAGING_PREFIX):
            return "is a staging directory of an unfinished save, not a checkpoint"
        marker = path / COMPLETE_FILE
        if not marker.exists():
            if (path / LATEST_FILE).exists() or any(path.glob(f"{_ITER_PREFIX}*")):
                return ("is a checkpoint root, not a checkpoint; pass one of its iter_* "
                        "directories, or resume=auto with checkpoint.dir set to it")
            return (f"has no {COMPLETE_FILE}: the save was interrupted (or this is not a "
                    "checkpoint), so its files may be partial")
        try:
            read_metadata(path)
        except (OSError, ValueError) as e:
            return f"has an unreadable {COMPLETE_FILE} ({e})"
        reason = integrity.bad_reason(path)
        if reason is not None:
            return f"was marked bad by a failed verification ({reason}; {path / integrity.BAD_MARKER})"
        return None

    def _available_text(self, path: Optional[Path] = None) -> str:
        roots = [self.root]
        if path is not None:
            other = path if (path / LATEST_FILE).exists() else path.parent
            if other.resolve() != self.root.resolve():
                roots.append(other)
        parts = []
        for i, root in enumerate(roots):
            names = [str(p) for _, p in CheckpointDir(root).list_complete()]
            if names or i == 0:  # the configured root always; a second one only if it has some
                parts.append(f"Complete checkpoints under {root}: "
                             + (", ".join(names) if names else "none"))
        return "; ".join(parts) + "."
