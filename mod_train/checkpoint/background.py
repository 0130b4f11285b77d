"""Checkpoint writes in the background (``checkpoint.async_save``): megatron dist-checkpointing's
async path, at most one save in flight, committed only when every rank's write has finished.

A save hands its ``AsyncRequest``s (``dist_checkpointing.save(..., async_sharded_save=True)``) to
:meth:`BackgroundWrites.schedule` on every rank, then :meth:`BackgroundWrites.arm` with the commit
to run afterwards. megatron's ``AsyncCallsQueue`` forks one writer process per request: the forked
process sees the state as it was at the fork (copy-on-write; on a GPU megatron first copies the
tensors to host), so training may change the weights while it writes. Finishing is collective:
:meth:`poll` (each step) and :meth:`finish` (next save, rollback, end of the run) all-reduce
"is any rank still writing", run megatron's finalization (global metadata, ``metadata.json``) and
only then the commit (rank 0 renames staging -> ``iter_*``, checksums, ``latest``, keep-K).
:meth:`abandon` (an exception) kills the writers without committing: ``latest`` stays the previous
checkpoint and the staging directory is removed by the next start (``clean_stale_staging``).
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

from mod_train.distributed.parent_death import die_with_parent


def write_in_child(write: Callable, delay_s: Optional[float], *args, **kwargs) -> None:
    """The writer process: dies with its rank (a kill -9 of the job leaves no writer behind), waits
    ``delay_s`` first (train.inject.checkpoint_write_delay_s: a test catches the write in flight)."""
    die_with_parent()
    if delay_s:
        time.sleep(delay_s)
    write(*args, **kwargs)


class BackgroundWrites:
    """The save in flight on this rank (all ranks hold one and call every method together)."""

    def __init__(self, delay_s: Optional[float] = None) -> None:
        self.delay_s = delay_s
        self.queue = None  # megatron's AsyncCallsQueue, made at the first save
        self.commit: Optional[Callable[[], object]] = None
        self.started: Optional[float] = None

    @property
    def in_flight(self) -> bool:
        return self.commit is not None or (self.queue is not None and self.queue.get_num_unfinalized_calls() > 0)

    def schedule(self, request) -> None:
        """Start writing ``request`` (an AsyncRequest, or None for nothing) in a forked process."""
        if request is None:
            return
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self.queue is None:
            self.queue = AsyncCallsQueue(persistent=False)
        if self.started is None:
            self.started = time.monotonic()
        if request.async_fn is not None:
            request = request._replace(async_fn=functools.partial(write_in_child, request.async_fn, self.delay_s))
        self.queue.schedule_async_request(request)

    def arm(self, commit: Callable[[], object]) -> None:
        """Run ``commit`` (collective) once every write scheduled since the last commit has finished."""
        self.commit = commit

    def poll(self):
        """Commit if every rank has finished writing (one all-reduce while a save is in flight);
        returns what the commit returned, or None."""
        return self._finalize(blocking=False)

    def finish(self):
        """Wait for the save in flight (if any) and commit it."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool):
        if not self.in_flight:
            return None
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
            if self.queue.get_num_unfinalized_calls() > 0:
                return None
        commit, self.commit, self.started = self.commit, None, None
        return commit() if commit is not None else None

    def abandon(self) -> None:
        """Stop the writers without committing (local, no collective: other ranks may be gone)."""
        self.commit, self.started = None, None
        if self.queue is not None:
            queue, self.queue = self.queue, None
            for call in list(queue.async_calls):
                try:
                    call.async_caller.close(abort=True)  # kills the forked writer
                except Exception:  # its log line asks torch.distributed for the rank: may be torn down
                    pass
            queue.async_calls.clear()
