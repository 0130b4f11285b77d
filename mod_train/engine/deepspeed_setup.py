"""The DeepSpeed engine around our megatron-core model: config, process-group adapter, optimizer."""

from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state as ps

from mod_train.config.schema import Config
from mod_train.config.validate import Derived
from mod_train.engine.lr_schedule import lambda_for


class MegatronMPU:
    """Presents megatron-core's parallel_state the way DeepSpeed's ``mpu`` argument expects.

    DeepSpeed sums the gradient norm over ``get_model_parallel_group()`` and counts a parameter
    that is not split across TP ranks only where ``get_tensor_model_parallel_rank() == 0``. The
    group is therefore TP x PP (every stage holds different layers) while the dedup rank is the TP
    rank. ``get_model_parallel_rank()`` must be unique over TP x PP because DeepSpeed names its
    checkpoint files by it.
    """

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return (ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size()
                + ps.get_tensor_model_parallel_rank())

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self):
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return ps.get_pipeline_model_parallel_world_size()


def deepspeed_config(cfg: Config, derived: Derived) -> dict:
    par = cfg.parallel
    zero: dict = {"stage": par.zero_stage}
    if par.zero_stage in (1, 2):
        # Bucket sizes sized for small models too; overlap_comm only pays off with NCCL streams.
        zero.update(reduce_bucket_size=5e7, allgather_bucket_size=5e7, overlap_comm=torch.cuda.is_available() and par.zero_stage == 2,
                    contiguous_gradients=True)
    if par.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, overlap_comm=False)
    return {
        # Megatron's schedule runs all micro-batches of a step and calls backward itself, so
        # DeepSpeed sees one "micro-batch" of micro x num_microbatches samples per step, and
        # managed_gradient_accumulation=false makes step() the reduction boundary.
        "train_micro_batch_size_per_gpu": par.micro_batch_size * derived.num_microbatches,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": derived.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def param_groups(chunks: List[torch.nn.Module], weight_decay: float) -> List[dict]:
    """No weight decay on norms and biases (1-D tensors), as in Megatron and nanoGPT."""
    decay, no_decay = [], []
    for chunk in chunks:
        for p in chunk.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def mark_norm_dedup(chunks: List[torch.nn.Module]) -> None:
    """Let DeepSpeed count TP-replicated parameters once per model-parallel group (see MegatronMPU).

    Stage 3 dedups with ``get_model_parallel_rank() == 0``; a replicated parameter on TP rank 0 of a
    later pipeline stage is flagged ``model_parallel`` so it is still counted there.
    """
    if ps.get_tensor_model_parallel_rank() != 0:
        return
    for chunk in chunks:
        for p in chunk.parameters():
            if not getattr(p, "tensor_model_parallel", False):
                p.model_parallel = True


def install_sequence_parallel_grad_sync(chunks: List[torch.nn.Module]) -> int:
    """Sum the gradients of sequence-parallel norm weights over the TP group.

    Under sequence parallelism each TP rank normalises only its slice of the sequence, so a norm
    weight's gradient is partial per rank (megatron's own DDP sums them in finalize_model_grads;
    DeepSpeed does not know about them). A tensor hook runs before the gradient is accumulated, so
    ZeRO's reduction hooks see the full gradient. Returns the number of parameters hooked.
    """
    import torch.distributed as dist

    group = ps.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "sequence_parallel", False) and p.requires_grad:
                p.register_hook(all_reduce)
                hooked += 1
    return hooked


# ----------------------------------------------------------------------------- expert parallelism
# megatron marks expert parameters ``allreduce=False`` when EP > 1; DeepSpeed calls such parameters
# MoE parameters (deepspeed.moe.utils.is_moe_param) and reduces / partitions them over the
# expert-data-parallel group it finds under ``param.group_name`` in deepspeed.utils.groups. The
# helpers below hand megatron's own expert groups to DeepSpeed (no new process groups), tag the
# parameters, split the optimizer groups the way DeepSpeed expects, and tell the engine that the
# model has MoE layers (it only looks for its own ``deepspeed.moe.layer.MoE`` modules).
#
# What DeepSpeed then does (ZeRO 1/2, deepspeed 0.19.8): expert gradients are divided by the full
# DP size and reduce-scattered over the expert-DP group (each expert's gradient is the sum over the
# tokens of all DP ranks, reaching it through the all-to-all); the gradient norm for clipping sums
# the squared norms of every partition over the whole DP group, which spans the EP group, so every
# expert counts once (then TP x PP as for dense parameters); the optimizer state of an expert is
# partitioned over its expert-DP group. ZeRO-3 and stage 0 are rejected in validate.py.


def expert_group_name() -> str:
    # DeepSpeed parses the EP size out of this name ("ep_size_<N>", groups._get_max_expert_size).
    return f"ep_size_{ps.get_expert_model_parallel_world_size()}"


def register_expert_groups() -> str:
    """Register megatron's expert-model-parallel and expert-data-parallel groups with DeepSpeed."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    name = expert_group_name()
    ep, edp = ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()
    # Several runs can share a process (tests): drop the groups of an earlier parallel_state.
    for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        table.clear()
    groups._EXPERT_PARALLEL_GROUP[name] = ep
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp)
    return name


def expert_params(chunks: List[torch.nn.Module]) -> List[torch.nn.Parameter]:
    """Parameters that live on one EP rank only (megatron: ``allreduce=False``)."""
    return [p for c in chunks for p in c.parameters() if getattr(p, "allreduce", True) is False]


def split_moe_param_groups(groups_: List[dict], group_name: str, experts: List[torch.nn.Parameter]) -> List[dict]:
    """Tag expert parameters and split every optimizer group into non-MoE / MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    for p in experts:
        p.group_name = group_name
    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups_)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


def _deepspeed_moe_marker(num_experts: int, group_name: str) -> torch.nn.Module:
    """A parameterless ``deepspeed.moe.layer.MoE`` whose presence sets ``engine.has_moe_layers``.

    It holds no experts (``num_local_experts = 0``): DeepSpeed's per-expert checkpoint files stay
    empty and the expert weights travel in the module and ZeRO files (see build_engine).
    """
    from deepspeed.moe.layer import MoE

    class MegatronExpertsForDeepSpeed(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.num_experts = num_experts
            self.num_local_experts = 0
            self.expert_group_name = group_name
            self.ep_size = ps.get_expert_model_parallel_world_size()

        def set_deepspeed_parallelism(self, *args, **kwargs):
            pass  # the groups are megatron's, registered by register_expert_groups()

        def forward(self, *args, **kwargs):
            raise RuntimeError("marker module, not a layer")

    return MegatronExpertsForDeepSpeed()


def _reload_params_from_zero_partitions(engine) -> None:
    """After load_checkpoint: DeepSpeed's model file is written by DP rank 0 only, so it holds that
    rank's experts; every rank's ZeRO file holds its own fp32 master partitions. Copy those back
    into the parameters (what the next optimizer step would do anyway) so each EP rank resumes with
    its own experts."""
    load = engine.load_checkpoint

    def load_checkpoint(*args, **kwargs):
        out = load(*args, **kwargs)
        if out[0] is not None and hasattr(engine.optimizer, "update_lp_params"):
            engine.optimizer.update_lp_params()
        return out

    engine.load_checkpoint = load_checkpoint


def build_engine(cfg: Config, derived: Derived, container: torch.nn.Module, chunks: List[torch.nn.Module]):
    """Wrap ``container`` (a ModuleList of model chunks) in a DeepSpeed engine with AdamW."""
    import deepspeed

    mark_norm_dedup(chunks)
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        install_sequence_parallel_grad_sync(chunks)
    o = cfg.optim
    groups_ = param_groups(chunks, o.weight_decay)
    experts = expert_params(chunks)
    if experts:
        name = register_expert_groups()
        groups_ = split_moe_param_groups(groups_, name, experts)
        chunks[0].add_module("deepspeed_moe_marker", _deepspeed_moe_marker(cfg.model.moe.num_experts, name))
    optimizer = torch.optim.AdamW(
        groups_, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        fused=torch.cuda.is_available(),
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=container,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda_for(o, cfg.train.max_steps)),
        config=deepspeed_config(cfg, derived),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    if experts:
        _reload_params_from_zero_partitions(engine)
    return engine, scheduler
