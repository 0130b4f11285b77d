"""Small facts and acts about the process world that every layer needs: a free rendezvous port,
this rank's device, and a barrier that is a no-op outside a process group.

Kept free of heavy imports at module level (``launch/`` imports :func:`free_port` before any
process exists).
"""

from __future__ import annotations

import os
import socket

__all__ = ["barrier", "default_device", "free_port"]


def free_port() -> int:
    """A localhost TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_device():
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists, else nothing (one process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
