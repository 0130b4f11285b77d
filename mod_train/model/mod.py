"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): THIS is where MoD routing happens.

A MoD layer is megatron-core's TransformerLayer (attention + MLP, or attention + MoE) run on the
top-k tokens of each sequence only:

    logits = router(x)                                  # one scalar per token
    idx    = top-k(logits over the sequence), sorted    # k = round(capacity x seq_len), static
    y      = TransformerLayer(x[idx], rope at positions idx)
    out    = x;  out[idx] += w(logits[idx]) * (y - x[idx])   # w: sigmoid / raw logit
    (others skip the layer on the residual stream)

Attention inside the layer runs over the gathered tokens in their original order with causal
masking, so a routed token attends to earlier routed tokens only; rotary embeddings are indexed
by the original positions. Top-k is not causal, so for sampling the layer also learns a causal
decision: the router's own sigmoid (``causal=aux_loss``) or a small MLP on a stop-gradient copy
of the input (``causal=predictor``), both trained with BCE against top-k membership.

Under sequence parallelism the layer input is split over TP ranks along the sequence; the router
and top-k need the whole sequence, so the input is gathered, routing is computed identically on
every TP rank, and the k selected tokens are split again for the block (k must divide by TP).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from mod_train.config.schema import ModConfig


# ----------------------------------------------------------------------------- routing primitives
def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[b, s] router logits -> [b, k] indices of the top-k tokens, in sequence order."""
    return torch.topk(logits, k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [s, b, h], idx [b, k] -> [k, b, h]."""
    h = x.size(-1)
    return torch.gather(x.transpose(0, 1), 1, idx.unsqueeze(-1).expand(-1, -1, h)).transpose(0, 1)


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, add: bool) -> torch.Tensor:
    """Out-of-place: x [s, b, h] with rows idx [b, k] replaced by (or increased by) values [k, b, h]."""
    h = x.size(-1)
    index = idx.unsqueeze(-1).expand(-1, -1, h)
    xb, vb = x.transpose(0, 1), values.transpose(0, 1).to(x.dtype)
    out = xb.scatter_add(1, index, vb) if add else xb.scatter(1, index, vb)
    return out.transpose(0, 1)


def gather_rope(rotary_pos_emb: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron's rope table [s, 1, 1, d] -> per-token frequencies [k, b, 1, d] at the original positions."""
    if rotary_pos_emb is None:
        return None
    table = rotary_pos_emb[:, 0, 0, :]  # [s, d]
    return table[idx].transpose(0, 1).unsqueeze(2)  # [k, b, 1, d]


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
    """Token scores for top-k, plus the causal decision used at sampling time."""

    def __init__(self, hidden: int, mod: ModConfig, init_std: float):
        super().__init__()
        self.weight_kind = mod.router_weight
        self.causal_kind = mod.causal
        self.linear = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.normal_(self.linear.weight, std=init_std)
        self.predictor: Optional[torch.nn.Sequential] = None
        if mod.causal == "predictor":
            ph = mod.predictor_hidden or max(hidden // 8, 1)
            self.predictor = torch.nn.Sequential(torch.nn.Linear(hidden, ph), torch.nn.SiLU(), torch.nn.Linear(ph, 1))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> logits [b, s] (fp32 for a stable top-k)."""
        return self.linear(x).squeeze(-1).transpose(0, 1).float()

    def causal_logits(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Logits of 'this token is routed', computable token by token. [b, s]."""
        if self.predictor is None:
            return router_logits
        return self.predictor(x.detach()).squeeze(-1).transpose(0, 1).float()

    def block_weight(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        if self.weight_kind == "sigmoid":
            return torch.sigmoid(logits)
        if self.weight_kind == "logit":
            return logits
        return None


# ----------------------------------------------------------------------------- the layer
class MoDTransformerLayer(TransformerLayer):
    """A megatron-core TransformerLayer that only processes the top-k tokens of each sequence."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None, capacity: float = 0.125, mod: Optional[ModConfig] = None, seq_length: int = 0):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        mod = mod or ModConfig(enabled=True)
        self.capacity = capacity
        self.k = max(1, round(capacity * seq_length))
        self.aux_loss_coeff = mod.aux_loss_coeff
        # Set by the trainer to 1/num_microbatches so the auxiliary gradient matches the LM loss's.
        self.aux_loss_scale = 1.0
        # "topk" while training and evaluating; "causal" applies the per-token decision (sampling).
        self.routing = "topk"
        self.router = MoDRouter(config.hidden_size, mod, config.init_method_std)
        self._recorder = None
        self._stats: dict = {}

    def attach_recorder(self, recorder) -> None:
        self._recorder = recorder

    def routing_stats(self) -> dict:
        return {k: float(v) for k, v in self._stats.items()}

    def _sequence_parallel(self) -> bool:
        return self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1

    def forward(self, hidden_states: torch.Tensor, *args, rotary_pos_emb=None, **kwargs):
        sp = self._sequence_parallel()
        # Routing sees the whole sequence: undo the sequence-parallel split. Everything outside the
        # block is computed identically on every TP rank, so the backward just keeps this rank's slice.
        x = (tensor_parallel.gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
             if sp else hidden_states)
        logits = self.router.scores(x)  # [b, s]
        if self.routing == "causal":
            out = self._forward_causal(x, logits, rotary_pos_emb, *args, **kwargs)
        else:
            out = self._forward_topk(x, logits, rotary_pos_emb, *args, **kwargs)
        if sp:
            out = tensor_parallel.scatter_to_sequence_parallel_region(out)
        return out, None

    def _block(self, selected: torch.Tensor, rope, *args, **kwargs) -> torch.Tensor:
        sp = self._sequence_parallel()
        if sp:
            selected = tensor_parallel.scatter_to_sequence_parallel_region(selected)
        out, _ = super().forward(selected, *args, rotary_pos_emb=rope, **kwargs)
        if sp:
            out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out

    def _weighted_update(self, selected, block_out, sel_logits) -> Optional[torch.Tensor]:
        """The block's update of the routed tokens scaled by their router weight [k, b, h]
        (None when the router weight is off: the block output then replaces the token)."""
        weight = self.router.block_weight(sel_logits)
        if weight is None:
            return None
        return (block_out - selected) * weight.transpose(0, 1).unsqueeze(-1).to(block_out.dtype)

    def _combine(self, x, idx, selected, block_out, sel_logits) -> torch.Tensor:
        delta = self._weighted_update(selected, block_out, sel_logits)
        if delta is None:
            return scatter_tokens(x, idx, block_out, add=False)
        return scatter_tokens(x, idx, delta, add=True)

    def _forward_topk(self, x, logits, rotary_pos_emb, *args, **kwargs) -> torch.Tensor:
        if self.k == x.size(0):
            # Capacity 1.0: top-k keeps every token in order, so gather/scatter are the identity;
            # skipping them gives the same numbers at the cost of the dense layer plus the router.
            block_out = self._block(x, rotary_pos_emb, *args, **kwargs)
            delta = self._weighted_update(x, block_out, logits)
            out = block_out if delta is None else x + delta.to(x.dtype)
            target = torch.ones_like(logits)
        else:
            idx = topk_indices(logits, self.k)
            selected = gather_tokens(x, idx)
            block_out = self._block(selected, gather_rope(rotary_pos_emb, idx), *args, **kwargs)
            out = self._combine(x, idx, selected, block_out, torch.gather(logits, 1, idx))
            # Top-k membership, the target of the causal decision (carries no gradient).
            target = torch.zeros_like(logits).scatter_(1, idx, 1.0)

        causal = self.router.causal_logits(x, logits)
        aux = F.binary_cross_entropy_with_logits(causal, target)
        if self.training and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, aux, self.aux_loss_coeff * self.aux_loss_scale)
        self._record(causal.detach(), target, aux.detach())
        return out

    def _forward_causal(self, x, logits, rotary_pos_emb, *args, **kwargs) -> torch.Tensor:
        """Route each token by its own causal decision (variable count per sequence)."""
        decide = self.router.causal_logits(x, logits) > 0
        outs = []
        for b in range(x.size(1)):
            idx = decide[b].nonzero().squeeze(-1).unsqueeze(0)  # [1, k_b]
            xb = x[:, b: b + 1]
            if idx.numel() == 0:
                outs.append(xb)
                continue
            selected = gather_tokens(xb, idx)
            block_out = self._block(selected, gather_rope(rotary_pos_emb, idx), *args, **kwargs)
            outs.append(self._combine(xb, idx, selected, block_out, torch.gather(logits[b: b + 1], 1, idx)))
        return torch.cat(outs, dim=1)

    def _record(self, causal_logits: torch.Tensor, target: torch.Tensor, aux: torch.Tensor) -> None:
        decision = (causal_logits > 0).float()
        self._stats = {
            f"mod/layer{self.layer_number}/causal_routed_frac": decision.mean(),
            f"mod/layer{self.layer_number}/causal_acc": (decision == target).float().mean(),
            f"mod/layer{self.layer_number}/aux_loss": aux,
        }
        if self._recorder is not None:
            for name, value in self._stats.items():
                self._recorder.record(name, value)


def mod_layer_spec(base: ModuleSpec, capacity: float, mod: ModConfig, seq_length: int) -> ModuleSpec:
    """The MoD twin of a dense/MoE layer spec: same submodules, routed module."""
    return ModuleSpec(module=MoDTransformerLayer, submodules=base.submodules,
                      params={"capacity": capacity, "mod": mod, "seq_length": seq_length})
