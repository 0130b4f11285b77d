"""Integrated MoDE (Raposo et al. 2024, arXiv 2404.02258, §3.5): no-op experts in the MoE router.

The router of an MoE layer scores E + n "experts": the E MLP experts and n no-op columns
(``model.moe.num_noop_experts``, default top_k). Each token takes its top-k of the E + n
(megatron-core's TopKRouter, unchanged, over E + n logits: softmax over the selected logits,
load-balancing and z-loss over all E + n, capacity dropping if set). A routing slot that lands on
a no-op column is removed from the routing map and probabilities *before* megatron's token
dispatcher sees them, so it is never permuted, communicated (all-to-all / all-gather) or computed:
it costs nothing in the MLP. With n >= top_k a token can put all its slots on no-ops and skip the
MLP entirely (the paper's "skip the computation"); with a single no-op column and top_k >= 2 it
never could (top-k picks distinct columns), hence the default n = top_k.

What a no-op slot contributes: nothing. The MoE output is added to the residual stream, so a
token whose slot is a no-op keeps its residual value for that slot, exactly like a token that a
MoD router sends around a block (the identity is the residual connection, not an extra
``prob x input`` term, which would change the residual stream of a token that "did nothing"). The
router still learns to use the no-ops: with top-k softmax a no-op's probability is part of the
normalisation of the k selected logits, so choosing it lowers the weight of the token's real
expert(s), and the load-balancing loss over E + n columns treats each no-op as one more expert
(keeping the no-op share near n / (E + n) of the slots unless the LM loss pays for more or fewer).

Logged per layer (besides the MoE statistics of ``moe.py``): ``moe/layer{n}/noop_frac``, the share
of routing slots on no-op columns in the logged step, i.e. the MLP work skipped (``flops.py``
counts ``top_k x (1 - noop_frac)`` experts per token). For the FLOP count every layer also adds
up its no-op and total slots over all training forward passes (device tensors, no host sync);
:func:`drain_noop_share` turns them into the share over the steps since its last call.
"""

from __future__ import annotations

import copy
import functools
from typing import Dict, List, Optional, Sequence, Union

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from mod_train.model.moe import ObservedMoELayer, ObservedRouter


class NoOpRouter(ObservedRouter):
    """The top-k router over E + n logits; columns E .. E + n - 1 are the no-op experts."""

    def __init__(self, config, pg_collection=None, num_noop_experts: int = 1):
        router_config = copy.copy(config)
        router_config.num_moe_experts = config.num_moe_experts + num_noop_experts
        super().__init__(config=router_config, pg_collection=pg_collection)


class _VariableCountAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher, told that tokens carry a variable number of slots.

    Dropless megatron assumes exactly top_k slots per token (``num_out_tokens = tokens x top_k``);
    with no-op slots removed it is the number of real slots, as with capacity dropping.
    """

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        out = super().preprocess(routing_map)
        if (not self.drop_and_pad and self.config.moe_expert_capacity_factor is None
                and not self.config.moe_router_padding_for_quantization
                and self.cuda_dtoh_point == "before_permutation_1"):
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return out


class MoDELayer(ObservedMoELayer):
    """An MoE layer whose router has ``num_noop_experts`` no-op columns (integrated MoDE)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, mod_seq_length=None,
                 num_noop_experts: int = 1):
        if submodules is not None:
            # megatron's MoELayer builds its router as ``submodules.router(config=..., pg_collection=...)``.
            submodules = copy.copy(submodules)
            submodules.router = functools.partial(submodules.router, num_noop_experts=num_noop_experts)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, mod_seq_length=mod_seq_length)
        self.num_noop_experts = num_noop_experts
        # Training slots on no-op columns and all slots, since the last drain_noop_share().
        self.noop_slots: Optional[torch.Tensor] = None
        if isinstance(self.token_dispatcher, MoEAlltoAllTokenDispatcher):
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            self.token_dispatcher = _VariableCountAlltoAllDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection if pg_collection is not None else get_default_pg_collection())
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def route(self, hidden_states: torch.Tensor, padding_mask=None):
        probs, routing_map = super().route(hidden_states, padding_mask)  # [tokens, E + n]; stats recorded
        e = self.config.num_moe_experts
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                slots = routing_map.size(0) * self.config.moe_router_topk  # as noop_frac's denominator
                counts = torch.stack([routing_map[:, e:].sum().to(torch.float64),
                                      torch.tensor(float(slots), dtype=torch.float64, device=routing_map.device)])
                self.noop_slots = counts if self.noop_slots is None else self.noop_slots + counts
        # Drop the no-op slots: the dispatcher and experts only ever see the E real experts.
        return probs[:, :e].contiguous(), routing_map[:, :e].contiguous()

    def _extra_stats(self, prefix: str, share: torch.Tensor, hidden_states: torch.Tensor) -> Dict[str, torch.Tensor]:
        stats = super()._extra_stats(prefix, share, hidden_states)
        stats[f"{prefix}/noop_frac"] = share[share.numel() - self.num_noop_experts:].sum()
        return stats


def mode_layers(chunks: Sequence[torch.nn.Module]) -> List[MoDELayer]:
    return [m for c in chunks for m in c.modules() if isinstance(m, MoDELayer)]


def drain_noop_share(chunks: Sequence[torch.nn.Module], num_layers: int,
                     device: Union[torch.device, str]) -> Optional[float]:
    """Share of routing slots on no-op columns over the training forward passes since the last
    call, the mean over integrated-MoDE layers (each layer's own share, so that a layer counted on
    several ranks, TP or DP, weighs like any other; FLOPs are linear in it and all MoE layers have
    the same experts, so the mean gives the model's FLOPs). None when no slot was counted.

    A collective over the default group (every rank holds some of the layers under PP): call it on
    every rank. Resets the counts."""
    import torch.distributed as dist

    table = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
    for m in mode_layers(chunks):
        if m.noop_slots is not None:
            table[m.layer_number - 1] += m.noop_slots.to(device)
            m.noop_slots = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    table = table.cpu()
    shares = [float(noop / total) for noop, total in table.tolist() if total > 0]
    return sum(shares) / len(shares) if shares else None
