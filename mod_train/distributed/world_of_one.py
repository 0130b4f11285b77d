"""A single-process world for offline tools (``mod-generate``, ``mod-export``).

Megatron's layers need ``parallel_state`` and a process group even in one process; these
helpers create a gloo group of one and TP=PP=1 (unless the caller already has them, e.g. a test)
and lay a checkpoint's recorded config out for one process (the config itself is read by
``mod_train.checkpoint.read.saved_config``).
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Iterator

import torch


class SingleProcessError(RuntimeError):
    """The process cannot host a world of one (launched by torchrun, TP/PP already > 1)."""


def _init() -> tuple:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from mod_train.compat import apply_cpu_patches

        apply_cpu_patches()
    made_pg = made_ps = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise SingleProcessError("this command runs in a single process; do not launch it with torchrun")
        # An in-memory store: a world of one needs no rendezvous, so no TCP port that another
        # process could take between choosing and binding it.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        made_pg = True
    if dist.get_world_size() != 1:
        raise SingleProcessError("this command runs in a single process; do not launch it with torchrun")
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            raise SingleProcessError("megatron parallel_state is already initialised with TP/PP > 1")
    else:
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        model_parallel_cuda_manual_seed(0)  # megatron's RNG tracker, needed to build a model
        made_ps = True
    return made_pg, made_ps


def _teardown(made_pg: bool, made_ps: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if made_ps and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if made_pg and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def world_of_one() -> Iterator[None]:
    """gloo group of one + parallel_state TP=PP=1 for the block; tears down only what it made."""
    made = _init()
    try:
        yield
    finally:
        _teardown(*made)


def single_process_layout(cfg):
    """The same model with every parallel dimension 1 (what one process holds)."""
    one = copy.deepcopy(cfg)
    par = one.parallel
    par.tp = par.pp = par.ep = par.cp = 1
    par.vpp = None
    par.sequence_parallel = False
    par.global_batch_size = None
    return one
