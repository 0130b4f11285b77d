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


def build_engine(cfg: Config, derived: Derived, container: torch.nn.Module, chunks: List[torch.nn.Module]):
    """Wrap ``container`` (a ModuleList of model chunks) in a DeepSpeed engine with AdamW."""
    import deepspeed

    mark_norm_dedup(chunks)
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        install_sequence_parallel_grad_sync(chunks)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(chunks, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
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
    return engine, scheduler
