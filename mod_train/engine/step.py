"""One training (or evaluation) step: megatron-core's forward/backward schedule + DeepSpeed's step.

Megatron's schedule (no pipelining, 1F1B, or interleaved) runs every micro-batch and calls
``torch.autograd.backward`` itself; DeepSpeed (configured with
``managed_gradient_accumulation=false``) accepts that torch-style backward and does the ZeRO
reduction, clipping and the optimizer update in ``engine.step()``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from mod_train.engine.update_policy import StepCheck, UpdatePolicy, Verdict
from mod_train.model.aux_losses import AuxLossRecorder
from mod_train.model.expert_bias import ExpertBiasUpdater
from mod_train.tracking import keys as K
from mod_train.model.mod import CausalThresholdCalibrator, causal_routing, mod_layers_of
from mod_train.model.recompute import check_drained, stashes_of


class ChunkView(torch.nn.Module):
    """What megatron's schedule sees as one model chunk.

    Calls go through the DeepSpeed engine (whose forward registers the hooks that let ZeRO
    accept a plain ``backward``); attributes such as ``set_input_tensor`` and ``config`` are
    found on the chunk itself via ``.module`` (megatron's ``get_attr_wrapped_model`` unwraps it).
    Under ZeRO stage 0 DeepSpeed does not support torch-style backward, so the chunk is called
    directly and DeepSpeed all-reduces gradients in ``step()``.

    An ``nn.Module`` because the interleaved (virtual pipeline) schedule asserts that every chunk
    is one; the engine is kept out of the module tree (a plain attribute in a tuple).
    """

    def __init__(self, engine, index: int, through_engine: bool):
        super().__init__()
        self._engine = (engine,)
        self.index = index
        self.module = engine.module[index]
        self.through_engine = through_engine

    @property
    def engine(self):
        return self._engine[0]

    def forward(self, *args, **kwargs):
        if self.through_engine:
            return self.engine(*args, chunk=self.index, **kwargs)
        return self.module(*args, **kwargs)


class ModelChunks(torch.nn.ModuleList):
    """The container handed to DeepSpeed: one GPTModel per virtual pipeline stage."""

    def forward(self, *args, chunk: int = 0, **kwargs):
        return self[chunk](*args, **kwargs)


def masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor, loss_factor: float = 1.0):
    """The schedule's loss function; ``loss_factor`` != 1 only where a test injects a fault."""
    losses = output.float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * mask) / mask.sum().clamp(min=1)
    if loss_factor != 1.0:
        loss = loss * loss_factor
    # clone: the schedule divides the returned loss by num_microbatches in place.
    return loss, {K.LM_LOSS: loss.detach().clone()}


def make_forward_step(loss_factor: float = 1.0) -> Callable:
    def forward_step(data_iterator: Iterator[dict], model: ChunkView):
        batch = next(data_iterator)
        # attention_mask: the per-sample document mask under data.reset_attention_mask, else None
        # (causal by mask type). Every pipeline stage reads the batch, so each stage's layers get it.
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return output, lambda out: masked_mean_loss(batch["loss_mask"], out, loss_factor)

    return forward_step


class StepMetrics:
    """What one step measured, kept on the device until ``materialize()``.

    Reading a loss or a norm on the host waits for the GPU, so the trainer materialises only
    the steps it logs. ``materialize()`` runs collectives (loss over pipeline stages and data
    ranks, routing statistics over ranks): every rank must call it for the same steps, and
    before the next step starts (the routing statistics belong to this step).
    """

    def __init__(self, reduce: Callable[[List[dict]], Dict[str, float]], losses: List[dict],
                 extra: Optional[dict] = None):
        self.reduce = reduce  # losses of the micro-batches -> metrics known on every rank
        self.losses = losses
        self.extra = extra or {}  # python floats or 0-dim tensors, e.g. the grad norm
        self.verdict: Verdict = Verdict.APPLY  # whether the step's update was applied (train steps)
        self._values: Optional[Dict[str, float]] = None

    def materialize(self) -> Dict[str, float]:
        if self._values is None:
            values = self.reduce(self.losses)
            values.update({k: float(v) for k, v in self.extra.items()})
            self._values = values
        return dict(self._values)


class StepRunner:
    def __init__(self, engine, cfg, derived, aux: AuxLossRecorder):
        self.engine = engine
        self.cfg = cfg
        self.derived = derived
        self.aux = aux
        through_engine = cfg.parallel.zero_stage > 0
        self.views: List[ChunkView] = [ChunkView(engine, i, through_engine) for i in range(len(engine.module))]
        self._tied_weight = self._tied_embedding_weight()
        if self._tied_weight is not None and not ps.is_pipeline_first_stage(ignore_virtual=True):
            # The last stage's copy has the same (summed) gradient as the first stage's embedding:
            # DeepSpeed skips "pipeline-replicated" parameters in the gradient norm, so it counts once.
            self._tied_weight.ds_pipe_replicated = True
        self.forward_backward = get_forward_backward_func()
        self.forward_step = make_forward_step()
        chunks = [v.module for v in self.views]
        self.calibrator = CausalThresholdCalibrator(chunks)
        self.expert_bias = ExpertBiasUpdater(chunks)
        self.has_mod = bool(mod_layers_of(chunks))
        self.routing_stashes = stashes_of(chunks)  # MoD selections kept for full recomputation

    def _read_batches(self, data_iterator) -> List[dict]:
        return [next(data_iterator) for _ in range(self.derived.num_microbatches)]

    def _run(self, batches: List[dict], forward_only: bool, loss_factor: float = 1.0) -> StepMetrics:
        n_chunks = len(self.views)
        # The step's micro-batches, read once. With virtual pipeline stages megatron's interleaved
        # schedule calls forward_step once per (chunk, micro-batch), each chunk reading its own
        # iterator: chunk c must see micro-batches 0..n-1 in order like every other chunk. (One
        # shared iterator would hand a first-stage rank's chunks alternating micro-batches, so the
        # inputs of the first chunk and the labels of the last would not belong together.)
        iterators = iter(batches) if n_chunks == 1 else [iter(batches) for _ in range(n_chunks)]
        model = self.views[0] if n_chunks == 1 else self.views
        self.aux.reset()
        losses = self.forward_backward(
            forward_step_func=self.forward_step if loss_factor == 1.0 else make_forward_step(loss_factor),
            data_iterator=iterators,
            model=model,
            num_microbatches=self.derived.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.parallel.micro_batch_size,
            forward_only=forward_only,
        )
        return StepMetrics(self.reduce_losses, losses)

    def mean_lm_loss(self, losses: List[dict]) -> float:
        """Mean lm loss over micro-batches and data-parallel ranks, known on every rank (a host sync).

        Only the last pipeline stage computes the loss; it is broadcast over the pipeline group.
        """
        value = torch.zeros(1, dtype=torch.float64, device=self.engine.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
            value[0] = torch.stack([d[K.LM_LOSS].reshape(()) for d in losses]).double().mean()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(value, src=last, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(value, group=ps.get_data_parallel_group())
            value /= ps.get_data_parallel_world_size()
        return float(value[0])

    def reduce_losses(self, losses: List[dict]) -> Dict[str, float]:
        """The step's metrics on every rank: ``mean_lm_loss`` and the per-layer routing statistics
        (this rank's micro-batches, averaged over DP ranks, gathered over the pipeline stages)."""
        out = {K.LM_LOSS: self.mean_lm_loss(losses)}
        summary = self.aux.summary()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # Routing statistics live with their layers: merge the stages' (disjoint) layer sets.
            stages: List[dict] = [{} for _ in range(ps.get_pipeline_model_parallel_world_size())]
            dist.all_gather_object(stages, summary, group=ps.get_pipeline_model_parallel_group())
            summary = {k: v for stage in stages for k, v in stage.items()}
        out.update(summary)
        return out

    def _sync_tied_embedding_grads(self) -> None:
        """Tied input/output embeddings under pipeline parallelism: sum the two copies' gradients.

        The first stage holds the embedding, the last stage a copy as output layer; megatron's own
        DDP all-reduces their gradients over the embedding group in finalize_model_grads, which
        DeepSpeed does not do. Pipeline parallelism allows ZeRO 0/1 only, where the gradients are
        still in ``.grad`` before ``engine.step()`` reduces them over data-parallel ranks.
        """
        weight = self._tied_weight
        if weight is None:
            return
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        dist.all_reduce(grad, group=ps.get_embedding_group())
        weight.grad = grad

    def _tied_embedding_weight(self):
        """This rank's copy of a tied embedding/output weight when PP splits the two, else None."""
        if (ps.get_pipeline_model_parallel_world_size() == 1
                or not ps.is_rank_in_embedding_group(ignore_virtual=True)
                or dist.get_world_size(ps.get_embedding_group()) == 1):
            return None
        chunk = self.views[0 if ps.is_pipeline_first_stage(ignore_virtual=True) else -1].module
        if not getattr(chunk, "share_embeddings_and_output_weights", False):
            return None
        return chunk.shared_embedding_or_output_weight()

    def train_step(self, data_iterator, policy: Optional[UpdatePolicy] = None, step: int = 0,
                   loss_factor: float = 1.0) -> StepMetrics:
        """Forward/backward over the step's micro-batches, then the update unless ``policy`` (asked
        with what all ranks agreed on, before ``engine.step()``) skips it. ``metrics.verdict`` says
        what happened; a skipped update leaves weights, optimizer state, LR schedule, the MoD
        threshold calibrator and the MoE expert bias as they were. ``loss_factor``: a test's
        injected fault (NaN, spike)."""
        for v in self.views:
            v.train()
        check_drained(self.routing_stashes, f"before training step {step}")
        metrics = self._run(self._read_batches(data_iterator), forward_only=False, loss_factor=loss_factor)
        check_drained(self.routing_stashes, f"training step {step}")  # every recompute took its selection
        self._sync_tied_embedding_grads()
        metrics.extra[K.LEARNING_RATE] = self.engine.get_lr()[0]  # the LR this update uses
        verdict = Verdict.APPLY
        if policy is not None and policy.screens:
            verdict = policy.decide(step, self.check_step(metrics, with_loss=policy.needs_loss))
        partitioned = self.engine.zero_optimization_partition_gradients()
        if verdict.applied or (partitioned and verdict in (Verdict.SKIP_NONFINITE, Verdict.ROLLBACK)):
            # ZeRO 2/3 reduced the gradients into the optimizer's partitions during backward, where
            # only step() clears them: a non-finite one is dropped by DeepSpeed's own overflow
            # check; a rollback's update is overwritten by the checkpoint it reloads.
            self.engine.step()
            if verdict.applied and not self.engine.was_step_applied():
                verdict = Verdict.SKIP_NONFINITE  # DeepSpeed found an overflow the checks did not see
            elif verdict is Verdict.SKIP_NONFINITE and self.engine.was_step_applied():
                raise RuntimeError(f"DeepSpeed applied an update with non-finite loss or gradients at step {step} "
                                   f"(its gradient-overflow check is off?)")
        else:
            self.discard_update()
        if not verdict.applied:
            self.calibrator.discard()
            self.expert_bias.discard()
        else:
            self.calibrator.update()  # the MoD causal threshold learns from applied steps only
            self.expert_bias.update()  # so does the MoE expert bias (megatron: finalize_model_grads)
            grad_norm = self.engine.get_global_grad_norm()  # None under ZeRO 0 (DeepSpeed keeps it internal)
            if grad_norm is not None:
                metrics.extra[K.GRAD_NORM] = grad_norm
        metrics.verdict = verdict
        return metrics

    def check_step(self, metrics: StepMetrics, with_loss: bool) -> StepCheck:
        """Whether the loss and this rank's gradients are finite on every rank (one all-reduce of a
        flag over all ranks, one host sync), and with ``with_loss`` the step's mean lm loss."""
        pieces = [d[K.LM_LOSS].reshape(()) for d in metrics.losses]
        # Gradients still in .grad (ZeRO 0/1; ZeRO 2/3 hold them in the optimizer's partitions,
        # which DeepSpeed's overflow check covers).
        pieces += [p.grad.reshape(-1) for c in self.engine.module for p in c.parameters() if p.grad is not None]
        bad = torch.zeros(1, dtype=torch.int32, device=self.engine.device)
        if pieces:
            bad[0] = (~torch.stack([torch.isfinite(t).all() for t in pieces]).all()).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        loss = self.mean_lm_loss(metrics.losses) if with_loss else None
        return StepCheck(finite=not bool(bad.item()), loss=loss)

    def discard_update(self) -> None:
        """Drop this step's gradients (ZeRO 0/1: still in ``.grad``); weights, optimizer state and
        LR schedule stay as they are. Counted like DeepSpeed counts an overflow step."""
        if self.engine.zero_optimization_partition_gradients():
            raise RuntimeError("skipping an update with finite gradients needs ZeRO stage 0 or 1 (validated)")
        if self.engine.zero_optimization():
            self.engine.optimizer.zero_grad(set_to_none=True)
        else:
            self.engine.zero_grad()
        self.engine.skipped_steps += 1
        self.engine.global_steps += 1

    @torch.no_grad()
    def eval_step(self, data_iterator) -> Dict[str, float]:
        """Losses of one step's micro-batches. A MoD model is evaluated twice on the same batches:
        ``lm loss`` with top-k routing (as trained; not causal: a token's routing depends on later
        tokens) and ``lm loss (causal)`` with each layer's causal decision (the model that samples,
        comparable with a dense model's causal loss)."""
        for v in self.views:
            v.eval()
        batches = self._read_batches(data_iterator)
        metrics = self._run(batches, forward_only=True).materialize()
        if self.has_mod:
            with causal_routing([v.module for v in self.views]):
                causal = self._run(batches, forward_only=True).materialize()
            metrics[K.LM_LOSS_CAUSAL] = causal[K.LM_LOSS]
        return metrics
