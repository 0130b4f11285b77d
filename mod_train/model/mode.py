"""Integrated MoDE (Raposo et al. 2024, arXiv 2404.02258, §3.5): a no-op expert in the MoE router.

The router of an MoE layer scores E + 1 "experts": the E MLP experts and one no-op. Each token
takes its top-k of the E + 1 (megatron-core's TopKRouter, unchanged, over E + 1 logits: softmax
over the selected logits, load-balancing and z-loss over all E + 1, capacity dropping if set).
A routing slot that lands on the no-op is removed from the routing map and probabilities *before*
megatron's token dispatcher sees them, so it is never permuted, communicated (all-to-all /
all-gather) or computed: it costs nothing in the MLP.

What a no-op slot contributes: nothing. The MoE output is added to the residual stream, so a
token whose slot is a no-op keeps its residual value for that slot, exactly like a token that a
MoD router sends around a block (the paper's no-op = "skip the computation"; the identity is the
residual connection, not an extra ``prob x input`` term, which would change the residual stream of
a token that "did nothing"). The router still learns to use the no-op: with top-k softmax the
no-op's probability is part of the normalisation of the k selected logits, so choosing it lowers
the weight of the token's real expert(s), and the load-balancing loss over E + 1 columns treats the
no-op as one more expert (keeping the no-op share near 1/(E + 1) of the slots unless the LM loss
pays for more or fewer).

Logged per layer (besides the MoE statistics of ``moe.py``): ``moe/layer{n}/noop_frac``, the share
of routing slots that went to the no-op expert, i.e. the MLP work skipped (``flops.py`` counts
``top_k x (1 - noop_frac)`` experts per token).
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from mod_train.model.moe import ObservedMoELayer, ObservedRouter


class NoOpRouter(ObservedRouter):
    """The top-k router over E + 1 logits; column E is the no-op expert."""

    def __init__(self, config, pg_collection=None):
        router_config = copy.copy(config)
        router_config.num_moe_experts = config.num_moe_experts + 1
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
    """An MoE layer whose router has a no-op expert (integrated MoDE)."""

    num_noop_experts = 1

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, mod_seq_length=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, mod_seq_length=mod_seq_length)
        if isinstance(self.token_dispatcher, MoEAlltoAllTokenDispatcher):
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            self.token_dispatcher = _VariableCountAlltoAllDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection if pg_collection is not None else get_default_pg_collection())
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def route(self, hidden_states: torch.Tensor, padding_mask=None):
        probs, routing_map = super().route(hidden_states, padding_mask)  # [tokens, E + 1]; stats recorded
        e = self.config.num_moe_experts
        # Drop the no-op slots: the dispatcher and experts only ever see the E real experts.
        return probs[:, :e].contiguous(), routing_map[:, :e].contiguous()

    def _extra_stats(self, prefix: str, share: torch.Tensor, hidden_states: torch.Tensor) -> Dict[str, torch.Tensor]:
        stats = super()._extra_stats(prefix, share, hidden_states)
        stats[f"{prefix}/noop_frac"] = share[-1]
        return stats
