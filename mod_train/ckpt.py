"""``mod-ckpt verify <dir>``: check a checkpoint's files against the sizes and checksums in its
complete.json, offline (no torch import). ``<dir>`` is one ``iter_*`` directory or a checkpoint
root (every ``iter_*`` under it). Read-only unless ``--mark`` (then a damaged checkpoint gets the
bad marker the trainer writes, so resume=auto skips it).

Exit codes: 0 every checkpoint good or unverified (written before checksums), 1 one is damaged,
2 the path holds no checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from mod_train.checkpoint import integrity
from mod_train.checkpoint.layout import COMPLETE_FILE, read_metadata


def _checkpoints(path: Path) -> List[Path]:
    if (path / COMPLETE_FILE).exists():
        return [path]
    return sorted(p for p in path.glob("iter_*") if p.is_dir())


def verify_command(path: Path, mark: bool) -> int:
    dirs = _checkpoints(path)
    if not dirs:
        print(f"mod-ckpt: {path} holds no checkpoint (no {COMPLETE_FILE}, no iter_* directories)", file=sys.stderr)
        return 2
    damaged = 0
    for d in dirs:
        start = time.perf_counter()
        try:
            verdict = integrity.verify(d, read_metadata(d))
        except (OSError, ValueError) as e:
            verdict = integrity.Verdict(integrity.Status.BAD, f"{d / COMPLETE_FILE} is missing or unreadable: {e}")
        took = time.perf_counter() - start
        if verdict.status is integrity.Status.GOOD:
            print(f"{d}: good ({verdict.files} files, {took:.2f} s)")
        elif verdict.status is integrity.Status.UNVERIFIED:
            print(f"{d}: unverified (no checksums in {COMPLETE_FILE}: written before they existed)")
        else:
            damaged += 1
            print(f"{d}: BAD: {verdict.problem}")
            if mark:
                print(f"  marked: {integrity.mark_bad(d, verdict.problem or 'damaged')}")
        earlier = integrity.bad_reason(d)
        if earlier is not None and verdict.status is not integrity.Status.BAD:
            print(f"  note: marked bad earlier ({earlier}); delete {d / integrity.BAD_MARKER} to trust it again")
    return 1 if damaged else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mod-ckpt", description="Checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every file's size and checksum against complete.json")
    v.add_argument("path", type=Path, help="an iter_* directory or a checkpoint root")
    v.add_argument("--mark", action="store_true", help="mark a damaged checkpoint bad (resume=auto skips it)")
    args = parser.parse_args(argv)
    return verify_command(args.path.expanduser(), args.mark)


if __name__ == "__main__":
    sys.exit(main())
