"""A hung step ends the job instead of holding its GPUs until the wall-clock limit.

A thread on every rank waits for the loop's heartbeat (each step, evaluation and checkpoint
beats); when one runs longer than ``train.step_timeout_s`` it writes every thread's stack
(faulthandler) to ``<run_dir>/watchdog/rank_<r>.txt`` and ends the process with
``WATCHDOG_EXIT_CODE`` (``os._exit``: a rank stuck in a collective cannot unwind). torchrun then
stops the other ranks and a requeued job resumes from the last checkpoint.

A thread rather than ``faulthandler.dump_traceback_later``: it says which step hung and where the
dump is, and exits with its own code. It runs whenever the main thread releases the GIL, which
a rank waiting in a collective or sleeping does.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from mod_train.callbacks.base import Callback
from mod_train.checkpoint.state import TrainState
from mod_train.engine.signals import WATCHDOG_EXIT_CODE

WATCHDOG_DIR = "watchdog"


def _exit_process(code: int) -> None:
    os._exit(code)


class StepWatchdog(Callback):
    def __init__(self, timeout_s: float, run_dir: Path, rank: int,
                 on_timeout: Callable[[int], None] = _exit_process) -> None:
        self.timeout_s = timeout_s
        self.dump_path = Path(run_dir) / WATCHDOG_DIR / f"rank_{rank:05d}.txt"
        self.rank = rank
        self.on_timeout = on_timeout  # tests replace the exit
        self._deadline: Optional[float] = None
        self._what = "start"
        self._cond = threading.Condition()
        self._stopped = False
        self.fired = False
        self._thread = threading.Thread(target=self._watch, name="mod-train-watchdog", daemon=True)
        self._thread.start()

    # -- the loop's side
    def beat(self, what: str) -> None:
        """Start the clock for ``what`` (a step, an evaluation, a checkpoint)."""
        with self._cond:
            self._deadline = time.monotonic() + self.timeout_s
            self._what = what
            self._cond.notify()

    def on_step_begin(self, state: TrainState) -> None:
        self.beat(f"step {state.step + 1}")

    def on_step(self, state: TrainState, step) -> None:
        self.beat(f"after step {state.step} (evaluation, checkpoint)")

    def on_eval(self, state: TrainState, metrics) -> None:
        self.beat(f"after the evaluation at step {state.step}")

    def on_save(self, state: TrainState, path: Path, last: bool) -> None:
        self.beat(f"after the checkpoint of step {state.step}")

    def on_restore(self, state: TrainState) -> None:
        self.beat(f"after the rollback to step {state.step}")

    def on_stop(self, state: TrainState, reason: str) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    # -- the thread
    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(timeout=left)
                    continue
                self._fire()
                return

    def _fire(self) -> None:
        self.fired = True
        self.dump_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dump_path, "w") as f:
            f.write(f"mod-train watchdog: rank {self.rank}: {self._what} ran past train.step_timeout_s="
                    f"{self.timeout_s:g} s; stacks of all threads:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        print(f"mod-train watchdog: rank {self.rank}: {self._what} ran past train.step_timeout_s="
              f"{self.timeout_s:g} s; stacks in {self.dump_path}; exiting with code {WATCHDOG_EXIT_CODE} "
              f"(a requeued job resumes from the last checkpoint)", file=sys.stderr, flush=True)
        self.on_timeout(WATCHDOG_EXIT_CODE)
