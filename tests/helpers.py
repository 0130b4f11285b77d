"""Shared test helpers: free ports and multi-process (gloo) launches.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes (spawn), gives
each a gloo ``torch.distributed`` world on a free localhost port, calls ``fn(rank, world_size,
*args)`` and returns the per-rank return values (anything ``torch.save`` can store). ``fn`` must
be importable by name (a module-level function of a test module or of this file). A failure in any
rank raises in the caller with that rank's traceback; a hang is killed after ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, List

from mod_train.distributed.world import free_port  # noqa: F401  (re-exported for tests)


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple,
           collective_timeout_s: float) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Each rank gets a share of the cores rather than oversubscribing them.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=collective_timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                    collective_timeout_s: float = 60.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; per-rank results."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dist-test-") as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args, collective_timeout_s),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish in {timeout_s}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


@contextlib.contextmanager
def restored_env(*keys: str) -> Iterator[None]:
    """Environment variables ``keys`` exactly as before the block (set or absent), whatever the
    code under test did to them process-wide."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
