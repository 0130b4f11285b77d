"""Processes that must not outlive their parent: a signal from the kernel when the parent dies.

torchrun starts its ranks in sessions of their own, so killing a launcher's process group left
them running (training and checkpointing beside a relaunched job). ``die_with_parent`` asks the
kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to send a signal to this process when its parent exits:
ranks get it from torchrun's agent, torchrun's agent from ``mod-launch``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Deliver ``sig`` to this process when its parent exits. False where unsupported (not Linux).

    Safe in a ``preexec_fn`` (no allocation beyond ctypes' call). If the parent is already gone
    (re-parented to init before the call), the signal is sent at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), int(sig))
    return True


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process exits.

    libc is loaded here, in the parent: between fork and exec the child only calls prctl (no
    import, no dlopen, which could deadlock on a lock held by another thread of the parent).
    """
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return setup


def started_by_torchrun() -> bool:
    """True in a rank started by torchrun's agent (its environment names the local rank and run)."""
    return "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ
