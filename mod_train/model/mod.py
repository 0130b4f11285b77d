"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): THIS is where MoD routing happens.

A MoD layer is megatron-core's TransformerLayer (attention + MLP, or attention + MoE) run on the
top-k tokens of each sequence only:

    logits = router(x)                                  # one scalar per token
    idx    = top-k(logits over the sequence), sorted    # k = max(1, round(capacity x seq_len))
    y      = TransformerLayer(x[idx], rope at positions idx)
    out    = x;  out[idx] += w(logits[idx]) * (y - x[idx])   # w: sigmoid / raw logit
    (others skip the layer on the residual stream)

Attention inside the layer runs over the gathered tokens in their original order with causal
masking, so a routed token attends to earlier routed tokens only; rotary embeddings are indexed
by the original positions. With a document mask (``data.reset_attention_mask``) the mask's rows
and columns are gathered at the routed positions too: a routed token attends to earlier routed
tokens of its own document only. Top-k is not causal, so for sampling the layer also learns a causal
decision: the router's own sigmoid (``causal=aux_loss``) or a small MLP on a stop-gradient copy
of the input (``causal=predictor``), both trained with BCE against top-k membership.

Numbers a researcher can trust:

* k comes from the length of the sequence actually seen (training, evaluation, sampling), so a
  shorter sequence keeps the configured capacity.
* Router and predictor run in fp32 whatever the training precision (megatron's
  ``router_gating_linear``, as its MoE router with ``moe_router_dtype=fp32``): in bf16 about half
  of the logits of a long sequence tie and top-k membership at the boundary would be arbitrary.
* Every rank of a tensor-parallel group uses the selection of the group's first rank (a broadcast
  of the indices), so a bit-level difference between ranks can never make them route different
  tokens and mix slices of different selections.
* The causal decision is ``causal_logit > threshold``, with a per-layer threshold calibrated while
  training (a running estimate of the (1 - capacity) quantile of the causal logits, averaged over
  data-parallel ranks) so that sampling routes the share of tokens the model was trained with;
  ``logit > 0`` alone routed about 7.5% instead of 12.5% in a trained ``tiny_mod``. The threshold is
  a buffer of the router: it is saved and resumed with the weights.
* With ``causal=aux_loss`` the BCE gradient also reaches the residual stream through the router's
  input; ``model.mod.aux_loss_detach_input=true`` feeds the BCE a detached input instead.

Under sequence parallelism the layer input is split over TP ranks along the sequence; the router
and top-k need the whole sequence, so the input is gathered, routing is computed identically on
every TP rank (the first TP rank's selection is used by all), and the k selected tokens are split
again for the block (padded to a multiple of TP where k does not divide).

Under activation recomputation (``model.recompute``) megatron runs a recomputed layer twice per
micro-batch: a no-grad forward, then again inside backward. The recompute reuses the top-k set of
the forward (a per-layer first-in first-out stash, never a second selection or TP broadcast), and
the auxiliary BCE loss, the routing statistics and the calibration observation happen once, in
the recompute, whose graph backward runs through; ``recompute.py`` says why and how a stale entry
is caught. Selective recomputation runs inside the block, after routing, and needs nothing here.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from mod_train.config.schema import ModConfig
from mod_train.model.flops import routed_tokens
from mod_train.model.moe import ensure_router_gemm_fallback
from mod_train.model.recompute import HasRoutingStash, Pass, RoutingStash, recompute_pass
from mod_train.model.routing_stats import RoutingStatsSource
from mod_train.tracking.keys import mod_layer_prefix


# ----------------------------------------------------------------------------- routing primitives
def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[b, s] router logits -> [b, k] indices of the top-k tokens, in sequence order."""
    return torch.topk(logits, k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [s, b, h], idx [b, k] -> [k, b, h]."""
    h = x.size(-1)
    return torch.gather(x.transpose(0, 1), 1, idx.unsqueeze(-1).expand(-1, -1, h)).transpose(0, 1)


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, add: bool) -> torch.Tensor:
    """Out-of-place: x [s, b, h] with rows idx [b, k] replaced by (or increased by) values [k, b, h].

    Scatters along the sequence dimension of x's own [s, b, h] layout, so the result is as
    contiguous as x: a MoD layer that ends a pipeline stage's model chunk sends it to the next
    stage, and gloo's send refuses a non-contiguous (transposed) tensor."""
    index = idx.t().unsqueeze(-1).expand(-1, -1, x.size(-1))  # [k, b, h]
    values = values.to(x.dtype)
    return x.scatter_add(0, index, values) if add else x.scatter(0, index, values)


def gather_rope(rotary_pos_emb: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron's rope table [s, 1, 1, d] -> per-token frequencies [k, b, 1, d] at the original positions."""
    if rotary_pos_emb is None:
        return None
    table = rotary_pos_emb[:, 0, 0, :]  # [s, d]
    return table[idx].transpose(0, 1).unsqueeze(2)  # [k, b, 1, d]


def gather_mask(mask: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron's attention mask [b or 1, 1, s, s] (True = masked out) -> the mask among the routed
    tokens [b, 1, k, k]: row i, column j of the result is the mask of positions idx[i], idx[j]."""
    if mask is None:
        return None
    b, k = idx.shape
    mask = mask.expand(b, -1, -1, -1)
    heads, s = mask.size(1), mask.size(-1)
    rows = torch.gather(mask, 2, idx[:, None, :, None].expand(b, heads, k, s))  # [b, 1, k, s]
    return torch.gather(rows, 3, idx[:, None, None, :].expand(b, heads, k, k))  # [b, 1, k, k]


def pad_mask_to_multiple(mask: torch.Tensor, multiple: int) -> torch.Tensor:
    """The mask [b, 1, n, n] of ``pad_to_multiple``'s n tokens, extended to its padded copies: no
    real token sees a copy, a copy sees what the last real token sees (never an empty row, whose
    softmax would be NaN; the copies' outputs are dropped)."""
    n = mask.size(-1)
    pad = (-n) % multiple
    if pad == 0:
        return mask
    hidden = mask.new_ones(*mask.shape[:-1], pad)
    real = torch.cat([mask, hidden], dim=-1)  # [b, 1, n, n + pad]
    copies = real[..., -1:, :].expand(*real.shape[:-2], pad, n + pad)
    return torch.cat([real, copies], dim=-2)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [n, ...] extended to a multiple of ``multiple`` rows by repeating its last row."""
    pad = (-x.size(0)) % multiple
    if pad == 0:
        return x
    return torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])


def quantile_threshold(values: torch.Tensor, share: float) -> torch.Tensor:
    """The threshold above which ``share`` of ``values`` lie: midway between the m-th and (m+1)-th
    largest value, m = round(share x n) (a 0-dim fp32 tensor; no host sync)."""
    flat = values.detach().reshape(-1).float()
    n = flat.numel()
    if n == 1:
        return flat[0]
    m = min(max(round(share * n), 1), n - 1)
    top = torch.topk(flat, m + 1).values
    return (top[m - 1] + top[m]) / 2


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: megatron's ``router_gating_linear``
    reshapes its incoming gradient with ``.view``, which fails on the transposed gradient of our
    [s, b] -> [b, s] logits."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T (+ bias) computed in fp32 from bf16 (or fp32) operands, keeping only the
    low-precision operands for backward (megatron's MoE router gating)."""
    # router_gating_linear flattens with .view: the residual stream after a MoD layer's scatter
    # can be a transposed (non-contiguous) tensor.
    return _ContiguousGrad.apply(router_gating_linear(x.contiguous(), weight, bias, torch.float32))


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient ``scale`` into ``aux_loss``.

    This adds an auxiliary loss to the objective without changing the reported LM loss (the
    same device megatron-core uses for the MoE load-balancing loss).
    """

    @staticmethod
    def forward(ctx, x, aux_loss, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


# ----------------------------------------------------------------------------- the router
class MoDRouter(torch.nn.Module):
    """Token scores for top-k, plus the causal decision used at sampling time (all in fp32)."""

    def __init__(self, hidden: int, mod: ModConfig, init_std: float):
        super().__init__()
        ensure_router_gemm_fallback()  # router_gating_linear without Transformer Engine
        self.weight_kind = mod.router_weight
        self.causal_kind = mod.causal
        self.detach_aux_input = mod.causal == "aux_loss" and mod.aux_loss_detach_input
        self.threshold_update_rate = mod.threshold_update_rate
        self.linear = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.normal_(self.linear.weight, std=init_std)
        self.predictor: Optional[torch.nn.Sequential] = None
        if mod.causal == "predictor":
            ph = mod.predictor_hidden or max(hidden // 8, 1)
            self.predictor = torch.nn.Sequential(torch.nn.Linear(hidden, ph), torch.nn.SiLU(), torch.nn.Linear(ph, 1))
        # The calibrated causal threshold (see the module docstring); a buffer, so it is saved,
        # loaded and resharded with the weights.
        self.register_buffer("causal_threshold", torch.zeros((), dtype=torch.float32))
        self._observed: List[torch.Tensor] = []  # this step's quantile estimates (one per micro-batch)

    def _apply(self, fn, recurse=True):
        # DeepSpeed/megatron cast the module to bf16 once at start; the threshold is compared with
        # fp32 logits and moves by small steps, so it stays fp32 (it is 0 when the cast happens).
        super()._apply(fn, recurse)
        self._buffers["causal_threshold"] = self._buffers["causal_threshold"].float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before thresholds were calibrated have none: they load with 0, the
        # decision they were sampled with (``logit > 0``), instead of failing a strict load.
        state_dict.setdefault(prefix + "causal_threshold", torch.zeros((), dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> fp32 logits [b, s] (fp32 matmul of the bf16 input and weight)."""
        return fp32_linear(x, self.linear.weight).squeeze(-1).transpose(0, 1)

    def causal_logits(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Logits of 'this token is routed', computable token by token. [b, s] fp32."""
        if self.predictor is None:
            return self.scores(x.detach()) if self.detach_aux_input else router_logits
        first, act, last = self.predictor
        hidden = act(fp32_linear(x.detach(), first.weight, first.bias))
        return F.linear(hidden, last.weight.float(), last.bias.float()).squeeze(-1).transpose(0, 1)

    def causal_decision(self, causal_logits: torch.Tensor) -> torch.Tensor:
        """Bool [b, s]: routed by the calibrated causal decision."""
        return causal_logits > self.causal_threshold

    def block_weight(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        if self.weight_kind == "sigmoid":
            return torch.sigmoid(logits)
        if self.weight_kind == "logit":
            return logits
        return None

    def observe(self, causal_logits: torch.Tensor, share: float) -> None:
        """Training forward: remember the threshold that would have routed ``share`` of these tokens."""
        if self.threshold_update_rate > 0:
            self._observed.append(quantile_threshold(causal_logits, share))

    def take_observed(self) -> Optional[torch.Tensor]:
        """Mean of this step's observations (None if none), and forget them."""
        if not self._observed:
            return None
        mean = torch.stack(self._observed).mean()
        self._observed = []
        return mean

    @torch.no_grad()
    def update_threshold(self, target: torch.Tensor) -> None:
        rate = self.threshold_update_rate
        self.causal_threshold.mul_(1.0 - rate).add_(rate * target.to(self.causal_threshold))


# ----------------------------------------------------------------------------- the layer
class MoDTransformerLayer(TransformerLayer, RoutingStatsSource, HasRoutingStash):
    """A megatron-core TransformerLayer that only processes the top-k tokens of each sequence."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None, capacity: float = 0.125, mod: Optional[ModConfig] = None, seq_length: int = 0,
                 aux_loss_scale: float = 1.0):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        mod = mod or ModConfig(enabled=True)
        self.capacity = capacity
        self.aux_loss_coeff = mod.aux_loss_coeff
        # 1/num_microbatches (from the layer spec) so the auxiliary gradient matches the LM loss's.
        self.aux_loss_scale = aux_loss_scale
        # "topk" while training and evaluating; "causal" applies the per-token decision (sampling).
        self.routing = "topk"
        self.router = MoDRouter(config.hidden_size, mod, config.init_method_std)
        # Top-k sets of full-recompute forward passes, for their recomputes (recompute.py).
        self.routing_stash = RoutingStash(f"MoD layer {layer_number}")
        if config.recompute_granularity == "full" and (config.fp8 or config.fp4):
            # megatron then recomputes through Transformer Engine's checkpoint, which does not set the
            # checkpoint flag that tells this layer's recompute from its forward (a second selection).
            raise ValueError("MoD layers with full activation recomputation need megatron's own checkpoint, "
                             "which fp8/fp4 replace by Transformer Engine's: use model.recompute.granularity="
                             "selective, or train MoD models without fp8/fp4.")

    def set_capacity(self, capacity: float) -> None:
        """Change the routed share from the next forward on (the capacity schedule calls it between
        steps only, so k is static within a step and within a phase of the schedule)."""
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"MoD capacity must be in (0, 1], got {capacity}")
        self.capacity = float(capacity)

    def k_for(self, seq_len: int) -> int:
        """Tokens routed in a sequence of ``seq_len`` (derived at every forward, not from the config)."""
        return routed_tokens(self.capacity, seq_len)

    def _sequence_parallel(self) -> bool:
        return self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1

    def _agree(self, decision: torch.Tensor) -> torch.Tensor:
        """The tensor-parallel group's first rank's copy of a routing decision, on every TP rank."""
        if self.config.tensor_model_parallel_size == 1 or not dist.is_initialized():
            return decision
        from megatron.core import parallel_state as ps

        wire = decision.to(torch.uint8) if decision.dtype == torch.bool else decision.contiguous()
        dist.broadcast(wire, src=ps.get_tensor_model_parallel_src_rank(), group=self.tp_group)
        return wire.bool() if decision.dtype == torch.bool else wire

    def forward(self, hidden_states: torch.Tensor, *args, rotary_pos_emb=None, attention_mask=None, **kwargs):
        sp = self._sequence_parallel()
        # Routing sees the whole sequence: undo the sequence-parallel split. Everything outside the
        # block is computed identically on every TP rank, so the backward just keeps this rank's slice.
        x = (tensor_parallel.gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
             if sp else hidden_states)
        logits = self.router.scores(x)  # [b, s]
        if self.routing == "causal":
            out = self._forward_causal(x, logits, rotary_pos_emb, attention_mask, *args, **kwargs)
        else:
            out = self._forward_topk(x, logits, rotary_pos_emb, attention_mask, *args, **kwargs)
        if sp:
            out = tensor_parallel.scatter_to_sequence_parallel_region(out)
        return out, None

    def _block(self, selected: torch.Tensor, rope, mask, *args, **kwargs) -> torch.Tensor:
        """The wrapped layer over the routed tokens ``selected`` [n, b, h], with their rope rows and
        attention mask [b, 1, n, n] (None: causal by mask type)."""
        if not self._sequence_parallel():
            out, _ = super().forward(selected, *args, rotary_pos_emb=rope, attention_mask=mask, **kwargs)
            return out
        # Sequence parallel splits the routed tokens over TP ranks. A count that does not divide
        # (a shorter sequence, causal routing) is padded with copies of the last token placed after
        # every real one: causal attention (or the padded document mask) keeps them invisible, and
        # their outputs are dropped.
        n, tp = selected.size(0), self.config.tensor_model_parallel_size
        selected = pad_to_multiple(selected, tp)
        if rope is not None:
            rope = pad_to_multiple(rope, tp)
        if mask is not None:
            mask = pad_mask_to_multiple(mask, tp)
        selected = tensor_parallel.scatter_to_sequence_parallel_region(selected)
        out, _ = super().forward(selected, *args, rotary_pos_emb=rope, attention_mask=mask, **kwargs)
        out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out[:n]

    def _weighted_update(self, selected, block_out, sel_logits) -> Optional[torch.Tensor]:
        """The block's update of the routed tokens scaled by their router weight [k, b, h]
        (None when the router weight is off: the block output then replaces the token)."""
        weight = self.router.block_weight(sel_logits)
        if weight is None:
            return None
        return (block_out - selected) * weight.transpose(0, 1).unsqueeze(-1).to(block_out.dtype)

    def combine(self, x, idx, selected, block_out, sel_logits) -> torch.Tensor:
        """x [s, b, h] with the routed rows ``idx`` [b, k] updated from the block's output: the
        router-weighted update added to ``selected`` (or the output itself without weighting)."""
        delta = self._weighted_update(selected, block_out, sel_logits)
        if delta is None:
            return scatter_tokens(x, idx, block_out, add=False)
        return scatter_tokens(x, idx, delta, add=True)

    def _forward_topk(self, x, logits, rotary_pos_emb, mask, *args, **kwargs) -> torch.Tensor:
        s = x.size(0)
        k = self.k_for(s)
        phase = recompute_pass(self.training)
        if k == s:
            # Capacity 1.0: top-k keeps every token in order, so gather/scatter are the identity;
            # skipping them gives the same numbers at the cost of the dense layer plus the router.
            block_out = self._block(x, rotary_pos_emb, mask, *args, **kwargs)
            delta = self._weighted_update(x, block_out, logits)
            out = block_out if delta is None else x + delta.to(x.dtype)
            target = torch.ones_like(logits)
        else:
            idx = self._select(logits, k, phase)
            selected = gather_tokens(x, idx)
            block_out = self._block(selected, gather_rope(rotary_pos_emb, idx), gather_mask(mask, idx),
                                    *args, **kwargs)
            out = self.combine(x, idx, selected, block_out, torch.gather(logits, 1, idx))
            # Top-k membership, the target of the causal decision (carries no gradient).
            target = torch.zeros_like(logits).scatter_(1, idx, 1.0)

        if phase is Pass.FIRST:
            return out  # aux loss, observation and statistics: once, in the recompute (recompute.py)
        causal = self.router.causal_logits(x, logits)
        aux = F.binary_cross_entropy_with_logits(causal, target)
        if self.training and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, aux, self.aux_loss_coeff * self.aux_loss_scale)
            self.router.observe(causal, k / s)
        self._record(causal.detach(), target, aux.detach(), k / s)
        return out

    def _select(self, logits: torch.Tensor, k: int, phase: Pass) -> torch.Tensor:
        """The top-k set [b, k] of this micro-batch, agreed over TP ranks; a recompute reuses the one
        its forward pass chose (stashed first-in first-out)."""
        if phase is Pass.RECOMPUTE:
            return self.routing_stash.pop(logits.size(0), k, logits.size(1))
        idx = self._agree(topk_indices(logits, k))
        if phase is Pass.FIRST:
            self.routing_stash.push(idx)
        return idx

    def _forward_causal(self, x, logits, rotary_pos_emb, mask, *args, **kwargs) -> torch.Tensor:
        """Route each token by its own causal decision (variable count per sequence)."""
        decide = self._agree(self.router.causal_decision(self.router.causal_logits(x, logits)))
        outs = []
        for b in range(x.size(1)):
            idx = decide[b].nonzero().squeeze(-1).unsqueeze(0)  # [1, k_b]
            xb = x[:, b: b + 1]
            if idx.numel() == 0:
                outs.append(xb)
                continue
            selected = gather_tokens(xb, idx)
            mask_b = None if mask is None else gather_mask(mask[b: b + 1] if mask.size(0) > 1 else mask, idx)
            block_out = self._block(selected, gather_rope(rotary_pos_emb, idx), mask_b, *args, **kwargs)
            outs.append(self.combine(xb, idx, selected, block_out, torch.gather(logits[b: b + 1], 1, idx)))
        return torch.cat(outs, dim=1)

    def _record(self, causal_logits: torch.Tensor, target: torch.Tensor, aux: torch.Tensor, share: float) -> None:
        """How well the causal decision (what sampling runs) matches top-k (what training runs)."""
        decision = self.router.causal_decision(causal_logits).float()
        hits = (decision * target).sum()
        prefix = mod_layer_prefix(self.layer_number)
        routed_frac = decision.mean()
        self.publish_stats({
            f"{prefix}/causal_routed_frac": routed_frac,
            # 1.0: sampling routes as many tokens as training did (capacity = k / s)
            f"{prefix}/causal_routed_vs_capacity": routed_frac / share,
            f"{prefix}/causal_precision": hits / decision.sum().clamp(min=1.0),
            f"{prefix}/causal_recall": hits / target.sum().clamp(min=1.0),
            f"{prefix}/causal_acc": (decision == target).float().mean(),
            f"{prefix}/causal_threshold": self.router.causal_threshold.detach().clone(),
            f"{prefix}/aux_loss": aux,
        })


def mod_layers_of(modules: Iterable[torch.nn.Module]) -> List[MoDTransformerLayer]:
    """Every MoD layer inside ``modules`` (model chunks, engines, ...), in order."""
    return [m for module in modules for m in module.modules() if isinstance(m, MoDTransformerLayer)]


@contextlib.contextmanager
def causal_routing(modules: Iterable[torch.nn.Module]) -> Iterator[List[MoDTransformerLayer]]:
    """Within the block every MoD layer routes by its causal decision (the model that samples)."""
    layers = mod_layers_of(modules)
    saved = [layer.routing for layer in layers]
    for layer in layers:
        layer.routing = "causal"
    try:
        yield layers
    finally:
        for layer, routing in zip(layers, saved):
            layer.routing = routing


class CausalThresholdCalibrator:
    """After each optimizer step, moves every MoD layer's causal threshold towards the mean of the
    step's observed (1 - capacity) quantiles, averaged over data-parallel ranks: one small
    all-reduce per step, no host sync. Every data-parallel rank must call ``update()`` each step."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self.routers = [layer.router for layer in mod_layers_of(modules)
                        if layer.router.threshold_update_rate > 0]

    def update(self) -> None:
        observed = [router.take_observed() for router in self.routers]
        if not self.routers or any(o is None for o in observed):
            return
        targets = torch.stack(observed)
        if dist.is_initialized():
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
                dist.all_reduce(targets, group=ps.get_data_parallel_group())
                targets /= ps.get_data_parallel_world_size()
        for router, target in zip(self.routers, targets):
            router.update_threshold(target)

    def discard(self) -> None:
        """A step whose update was skipped (non-finite, spike): its observations, possibly NaN,
        must not reach the threshold with the next applied step's."""
        for router in self.routers:
            router.take_observed()


def mod_layer_spec(base: ModuleSpec, capacity: float, mod: ModConfig, seq_length: int,
                   aux_loss_scale: float = 1.0) -> ModuleSpec:
    """The MoD twin of a dense/MoE layer spec: same submodules, routed module. ``aux_loss_scale``:
    1/num_microbatches, so the auxiliary gradient is scaled like the LM loss's."""
    return ModuleSpec(module=MoDTransformerLayer, submodules=base.submodules,
                      params={"capacity": capacity, "mod": mod, "seq_length": seq_length,
                              "aux_loss_scale": aux_loss_scale})
