"""Shared fixtures. Multi-process helpers live in tests/helpers.py."""

import os
import socket

import pytest


@pytest.fixture(scope="session")
def world_of_one():
    """A real gloo process group of one rank, with the CPU adaptations applied (once per session)."""
    import torch.distributed as dist

    from mod_train.distributed.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture
def megatron_tp1(world_of_one):
    """megatron parallel_state for TP=PP=1, torn down after the test."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(0)
    yield ps
    ps.destroy_model_parallel()
