"""Aux-loss-free MoE load balancing (``model.moe.load_balancing=expert_bias``, arXiv 2408.15664).

megatron-core's TopKRouter (``moe_router_enable_expert_bias``) adds a per-expert bias to the
sigmoid scores when it picks a token's top-k experts (the combine weights stay the unbiased scores)
and counts the routing slots per expert of every training forward pass in its
``local_tokens_per_expert`` buffer. megatron moves the bias in ``finalize_model_grads``, which
this project does not run (DeepSpeed reduces the gradients); :class:`ExpertBiasUpdater` does the
same with megatron's public ``get_updated_expert_bias``: all-reduce the counts over TP x CP x DP
(the global batch), then every expert's bias moves by ``moe_router_bias_update_rate`` towards the
mean load (up when under-loaded, down when over-loaded).

Only an applied optimizer step moves the bias: a skipped step (non-finite, spike, rollback)
discards its counts, as the MoD threshold calibrator discards its observations. The bias is a
persistent buffer of the router, so it is saved, resumed and resharded with the model's weights
(DeepSpeed's module state and the layout-free ``model/`` copy); the counts are not saved (they
are zero between steps).
"""

from __future__ import annotations

from typing import Iterable, List

import torch
from megatron.core.transformer.moe.router import TopKRouter


def expert_bias_routers(modules: Iterable[torch.nn.Module]) -> List[TopKRouter]:
    return [m for c in modules for m in c.modules() if isinstance(m, TopKRouter) and m.enable_expert_bias]


class ExpertBiasUpdater:
    """After each applied optimizer step, moves every expert-bias router's bias with megatron's
    update rule. Collective over megatron's tensor-and-data-parallel group (with CP): every rank
    calls ``update()`` or ``discard()`` each training step (the ranks of a group hold the same
    layers, so they agree on whether there is anything to update)."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self.routers = expert_bias_routers(modules)

    @torch.no_grad()
    def update(self) -> None:
        if not self.routers:
            return
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        rate = self.routers[0].config.moe_router_bias_update_rate
        counts = torch.stack([r.local_tokens_per_expert for r in self.routers])
        biases = torch.stack([r.expert_bias for r in self.routers])
        for router, new in zip(self.routers, get_updated_expert_bias(counts, biases, rate)):
            router.expert_bias.copy_(new)
        self.discard()

    @torch.no_grad()
    def discard(self) -> None:
        """A step whose update was skipped: its routing counts never reach the bias."""
        for router in self.routers:
            router.local_tokens_per_expert.zero_()
