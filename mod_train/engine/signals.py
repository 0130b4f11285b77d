"""Stop signals: Slurm's pre-emption warning (SIGUSR1) and a job's termination (SIGTERM) become a
flag that every rank agrees on at the end of a step, so the run stops there with a checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

# Exit code of an invocation stopped by a signal (a pre-empted job) after its checkpoint was saved.
PREEMPTED_EXIT_CODE = 124
# Exit code of a rank the step watchdog ended (callbacks/watchdog.py): a hung job, to be requeued.
WATCHDOG_EXIT_CODE = 86
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopSignals:
    """SIGUSR1/SIGTERM become a flag; the loop stops at the end of the step with a checkpoint. The
    flag is all-reduced (MAX) every step, so all ranks stop at the same step even if the signal
    reached only some of them. Under NCCL the flag travels over a gloo group on the host, so
    checking it never waits for the GPU.

    ``mod-train`` installs it first thing (before Hydra and the heavy imports), so a signal during
    the slow start-up is not lost, and hands it to the trainer."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}
        self._group = None  # the host-side group for the flag (None: the default group is gloo)

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # only sets the flag: safe at any point of the step
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def attach_group(self) -> None:
        """Once, on every rank, after the process group exists."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def agreed(self) -> Optional[str]:
        """The signal name if any rank got one (a collective: every rank calls it every step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)  # host memory
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if not int(flag.item()):
            return None
        return self.received or "a signal on another rank"
