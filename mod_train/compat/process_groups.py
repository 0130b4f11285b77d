"""Process-groups family: a process that initializes megatron's parallel_state again reuses the
process groups it created the first time instead of adding a new set.

megatron-core 0.16.1's ``destroy_model_parallel()`` sets its group globals to None but leaves the
groups alive in c10d (Megatron-LM issue #6897; the fix, PRs #6902 / #7029, is not in a release),
and destroying them would not free them either: a trained model's parameters and DeepSpeed's
gradient hooks hold them through autograd nodes that Python's collector cannot see. On CPU each
group is a gloo group with a transport thread that wakes 100 times a second (gloo's tcp loop
polls with a 10 ms timeout). Only a process that initializes more than once is affected -- our
multi-job test drivers, the test process, in-process generation (``world_of_one``) -- but there
it adds up: 17 groups per initialization of a world of one; one test process held 766 polling
threads after its unit tests, and the machine spent most of its time in the kernel waking them.

The patch: ``create_group`` called again with the same arguments (ranks, backend, timeout,
description, no NCCL options) under the same default process group returns the group it made
before, if c10d still holds it. Every rank makes the same calls in the same order, so every rank
hits or misses alike and c10d's group counter stays in step across ranks. A group is only a set
of ranks to run collectives on; jobs in one process run one after another, so reusing it changes
no result (the equivalence tests compare multi-job drivers against single runs).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch.distributed as dist

from mod_train.compat.patch import (Family, Patch, is_marked, mark, module, require_attr, require_module,
                                    set_attr, upstream_attr)

__all__ = ["PATCHES"]

_PARALLEL_STATE = "megatron.core.parallel_state"


def _still_held(group) -> bool:
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # this rank is not in it: nothing to hold
        return True
    # The check megatron's destroy_model_parallel makes before destroying its gloo side-groups.
    return dist.distributed_c10d._world.pg_map.get(group, None) is not None


def _reusing_create_group(upstream_create_group):
    # key -> (default group it was made under, group). Process-wide, like c10d's own registry.
    made: Dict[Tuple, Tuple[object, object]] = {}

    def create_group(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                     group_desc=None):
        kwargs = dict(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options,
                      use_local_synchronization=use_local_synchronization, group_desc=group_desc)
        if pg_options is not None or ranks is None:  # NCCL options are objects: never assume two are equal
            return upstream_create_group(**kwargs)
        key = (tuple(ranks), timeout, backend, use_local_synchronization, group_desc)
        world = dist.group.WORLD
        if key in made:
            made_under, group = made[key]
            if made_under is world and _still_held(group):
                return group
        group = upstream_create_group(**kwargs)
        made[key] = (world, group)
        return group

    return create_group


def _apply() -> None:
    ps = module(_PARALLEL_STATE)
    if not is_marked(ps.create_group):
        set_attr(ps, "create_group", mark(_reusing_create_group(upstream_attr(ps, "create_group"))))


def _check() -> None:
    ps = module(_PARALLEL_STATE)
    # Every group megatron makes goes through create_group (looked up at call time: patchable),
    # with these keyword arguments; destroy_model_parallel still only forgets them.
    require_attr(ps, "create_group", "ranks=None", "timeout=None", "backend=None", "pg_options=None",
                 "use_local_synchronization=False", "group_desc=None", "torch.distributed.new_group(**kwargs)")
    require_attr(ps, "destroy_model_parallel", "_global_process_group_list = None")
    require_module(_PARALLEL_STATE, "group = create_group(")
    require_module("torch.distributed.distributed_c10d", "_world = _World()")


PATCHES = (
    Patch("reuse-process-groups", Family.process_groups, "megatron.core.parallel_state.create_group",
          _apply, _check),
)
