"""Process group and megatron parallel_state initialisation (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mod_train.compat import apply_cpu_patches
from mod_train.config.schema import ParallelConfig
from mod_train.config.validate import expert_tensor_parallel_size
from mod_train.distributed.world import default_device, free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ensure_env_for_single_process() -> None:
    """Allow `python -m mod_train.train` without torchrun: a world of one on localhost."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    # No launcher set a rank: this world of one is ours alone, so its store gets a port of its own.
    # A MASTER_PORT inherited from the parent (a test process, a notebook with its own process
    # group) is usually held by that parent's store: reusing it fails with EADDRINUSE.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def init_distributed(parallel: ParallelConfig, seed: int) -> DistEnv:
    """Start torch.distributed (via DeepSpeed, so its comm layer is set up too) and parallel_state.

    A collective that waits longer than ``parallel.collective_timeout_s`` raises (megatron's own
    groups take whole minutes, rounded up)."""
    import deepspeed

    ensure_env_for_single_process()
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        apply_cpu_patches()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device()
    if has_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if has_cuda else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=parallel.collective_timeout_s))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=expert_tensor_parallel_size(parallel),
        distributed_timeout_minutes=max(1, math.ceil(parallel.collective_timeout_s / 60)),
        # megatron's gloo side-groups are only needed for its distributed optimizer; on CPU the
        # main groups already are gloo.
        create_gloo_process_groups=has_cuda,
    )
    seed_everything(seed)
    return DistEnv(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                   device=device, backend=backend)


def seed_everything(seed: int) -> None:
    """Same seed on every rank for parameter init; megatron's tracker adds the TP/PP offsets."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown(keep_process_group: bool = False, failed: bool = False) -> None:
    """Tear down parallel_state (and the process group unless several runs share one process).

    ``failed``: this rank raised; no barrier, since the other ranks may be waiting inside a
    collective that will never complete -- the exception must reach torchrun, which stops them.
    """
    if dist.is_initialized() and not failed:
        dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
