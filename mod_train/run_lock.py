"""One job per run directory: ``<run_dir>/.run.lock`` names the owner (host, PIDs, Slurm job).

Taken before anything is written into the run directory and removed at exit. A lock is broken
only when its owner is provably gone: on this host, none of its PIDs is alive (a PID reused by
another process counts as gone: its start time differs); a Slurm job's earlier incarnation
(same job id, lower restart count) is gone once the job is requeued. A lock held from another
host is never broken automatically: the error names the owner and how to remove it.

A launcher (``mod-launch``) takes the lock and exports ``MOD_TRAIN_RUN_LOCK`` (its owner token);
the training processes it starts then join the lock (rank 0 adds its PID, so the lock stays held
while any of them still runs) instead of refusing their own launcher.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

LOCK_FILE = ".run.lock"
# "<host>:<pid>" of the process holding the lock for a launched tree (read by the children).
LOCK_ENV = "MOD_TRAIN_RUN_LOCK"


class RunDirLocked(RuntimeError):
    """Another live job owns the run directory; the message names it and how to break the lock."""


def _start_time(pid: int) -> Optional[str]:
    """Kernel start time of ``pid`` (Linux /proc; None elsewhere or if gone): tells PID reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the comm field


def _alive(pid: int, start_time: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if start_time is not None and _start_time(pid) not in (None, start_time):
        return False  # the PID now belongs to another process
    return True


@dataclass
class Holder:
    pid: int
    start_time: Optional[str]


@dataclass
class LockOwner:
    host: str
    holders: List[Holder] = field(default_factory=list)
    slurm_job_id: Optional[str] = None
    slurm_restart_count: int = 0
    since: str = ""
    command: str = ""

    @classmethod
    def me(cls) -> "LockOwner":
        return cls(host=socket.gethostname(), holders=[Holder(os.getpid(), _start_time(os.getpid()))],
                   slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                   slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                   since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   command=" ".join(sys.argv)[:300])

    @classmethod
    def from_json(cls, text: str) -> "LockOwner":
        d = json.loads(text)
        d["holders"] = [Holder(**h) for h in d.get("holders", [])]
        return cls(**d)

    def token(self) -> str:
        return f"{self.host}:{self.holders[0].pid}"

    def describe(self) -> str:
        pids = ", ".join(str(h.pid) for h in self.holders)
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, PID {pids}{job}, since {self.since} ({self.command})"

    def provably_gone(self) -> bool:
        mine = LockOwner.me()
        if self.slurm_job_id and self.slurm_job_id == mine.slurm_job_id \
                and self.slurm_restart_count < mine.slurm_restart_count:
            return True  # a requeued job: Slurm ended the earlier incarnation everywhere
        if self.host != mine.host:
            return False  # cannot see the other host's processes
        return not any(_alive(h.pid, h.start_time) for h in self.holders)


class RunLock:
    """``RunLock(run_dir).acquire()``: own the run directory until ``release()`` (also at exit)."""

    def __init__(self, run_dir) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner: Optional[LockOwner] = None
        self.joined = False  # True: held by our launcher, we only added our PID

    def _read(self) -> Optional[LockOwner]:
        try:
            return LockOwner.from_json(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # Half-written by a writer killed between create and write: treat as held for a moment.
            time.sleep(0.2)
            try:
                return LockOwner.from_json(self.path.read_text())
            except FileNotFoundError:
                return None
            except (OSError, ValueError, TypeError):
                return LockOwner(host="?", since="unknown", command=f"unreadable lock file {self.path}")

    def _write_new(self, owner: LockOwner) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(owner)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break(self, stale: LockOwner) -> None:
        # Rename first: of two jobs breaking the same stale lock, only one rename succeeds.
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            now = self._read_file(aside)
            if now is not None and now.token() != stale.token():
                os.rename(aside, self.path)  # a new owner slipped in between read and rename: give it back
                return
        finally:
            if aside.exists():
                aside.unlink()

    @staticmethod
    def _read_file(path: Path) -> Optional[LockOwner]:
        try:
            return LockOwner.from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self) -> "RunLock":
        """Own the run directory (creating it), or join our launcher's lock. RunDirLocked otherwise."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        inherited = os.environ.get(LOCK_ENV)
        for _ in range(20):
            current = self._read()
            if current is None:
                me = LockOwner.me()
                if self._write_new(me):
                    self.owner = me
                    atexit.register(self.release)
                    return self
                continue
            if inherited and current.token() == inherited and not current.provably_gone():
                self._join(current)
                return self
            if current.provably_gone():
                self._break(current)
                continue
            raise RunDirLocked(self._refusal(current))
        raise RunDirLocked(f"could not take the lock {self.path} (it keeps changing): another job is starting "
                           f"on train.run_dir={self.run_dir}.")

    def _join(self, current: LockOwner) -> None:
        current.holders.append(Holder(os.getpid(), _start_time(os.getpid())))
        tmp = self.path.with_name(f"{LOCK_FILE}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(current)) + "\n")
        os.replace(tmp, self.path)
        self.owner, self.joined = current, True

    def _refusal(self, owner: LockOwner) -> str:
        here = socket.gethostname()
        how = (f"if that job is gone (check with `ssh {owner.host} ps -p {owner.holders[0].pid if owner.holders else '?'}`"
               f"{' or `squeue -j ' + owner.slurm_job_id + '`' if owner.slurm_job_id else ''}), delete {self.path}"
               if owner.host != here else
               f"stop it first (kill {' '.join(str(h.pid) for h in owner.holders)}), or use another train.run_dir")
        return (f"train.run_dir={self.run_dir} is in use by another job ({owner.describe()}); two jobs must not "
                f"write one run directory. To go on: {how}.")

    def export_env(self, env: dict) -> dict:
        """``env`` plus the token that lets the processes we start join this lock."""
        assert self.owner is not None
        return {**env, LOCK_ENV: self.owner.token()}

    def release(self) -> None:
        """Remove the lock if we took it (joined locks stay with the launcher). Idempotent."""
        if self.owner is None or self.joined:
            return
        current = self._read_file(self.path)
        if current is not None and current.token() == self.owner.token():
            self.path.unlink(missing_ok=True)
        self.owner = None
