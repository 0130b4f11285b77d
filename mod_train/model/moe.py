"""Mixture-of-Experts layers: megatron-core's MoELayer with routing statistics and EP-independent init.

Three small megatron-core subclasses, put into the layer spec by ``specs.py``:

* :class:`ObservedRouter` (a ``TopKRouter``) keeps the load-balancing loss and the router z-loss of
  its last forward pass (megatron logs them only into its global tracker).
* :class:`ObservedMoELayer` (a ``MoELayer``) records, per forward pass and as device tensors (no
  host sync), under ``moe/layer{n}/``: ``load_e{i}`` (share of the top-k routing slots that went to
  expert i), ``load_max`` (the busiest expert's share x number of experts: 1.0 is perfectly
  balanced), ``dropped_frac`` (slots dropped by the capacity factor; only when it is set),
  ``aux_loss`` (load-balancing loss, aux_loss or seq_aux_loss, before its coefficient), ``z_loss``
  (mean squared logsumexp of the router logits), ``expert_bias_max_abs`` (with
  ``load_balancing=expert_bias``: the largest |bias| of a real expert; ``expert_bias.py`` moves it),
  and in a staged-MoDE layer ``skip_frac`` (share of the sequence that the
  enclosing MoD router sent around the block). It also counts slots per expert for the routing
  heatmap written at checkpoints (:func:`gather_routing_loads` computes the shares; the drawing is
  ``mod_train.tracking.plots.plot_routing_heatmap``).
* :class:`SeededSequentialMLP` (megatron's ``SequentialMLP``) draws every expert from a generator
  seeded by (layer seed, *global* expert index), so an expert's initial weights do not depend on
  the expert-parallel size: with ``use_cpu_initialization`` megatron draws each EP rank's local
  experts from the same stream, which makes the experts of different EP ranks identical and the
  EP=2 model differ from the EP=1 model. The layer seed is one draw from the default generator
  (the same for every EP size) and the experts are built inside a forked RNG state, so the rest of
  the model is drawn identically for every EP size too. :class:`SeededTEGroupedMLP` does the same
  for megatron's grouped-GEMM experts (``model.moe.grouped_gemm``, see ``expert_mlp.py``).

Integrated MoDE (a no-op expert in the router) builds on these in ``mode.py``.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from mod_train.model.recompute import Pass, recompute_pass
from mod_train.model.routing_stats import RoutingStatsSource
from mod_train.tracking.keys import moe_layer_prefix

log = logging.getLogger(__name__)


def ensure_router_gemm_fallback() -> None:
    """Without Transformer Engine megatron's router references an unbound ``te_general_gemm``
    (NameError in every MoE router, CPU or GPU). The compat registry's no-TE patches bind it to
    None (upstream's own torch.mm fallback) whenever TE is absent, not only on CPU."""
    from mod_train.compat import apply_missing_te_patches

    apply_missing_te_patches()


# ----------------------------------------------------------------------------- router
class ObservedRouter(TopKRouter):
    """megatron's top-k router that keeps its last auxiliary and z-loss values for logging."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False, valid_token_count=None):
        if aux_loss_name in ("load_balancing_loss", "seq_load_balancing_loss"):
            self.last_aux_loss = (aux_loss / aux_loss_coeff).detach()
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    def apply_z_loss(self, logits, padding_mask=None):
        with torch.no_grad():
            self.last_z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
        return super().apply_z_loss(logits, padding_mask=padding_mask)


# ----------------------------------------------------------------------------- layer
class ObservedMoELayer(MoELayer, RoutingStatsSource):
    """megatron-core's MoELayer plus per-layer routing statistics (see module docstring).

    ``mod_seq_length``: set for the MoE layer of a staged-MoDE layer (inside a MoD layer), the
    full sequence length, to report the share of tokens the MoD router skipped.
    """

    # Routing-map columns that are real experts; mode.py's integrated MoDE adds a no-op column.
    num_noop_experts = 0

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 mod_seq_length: Optional[int] = None):
        ensure_router_gemm_fallback()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        self.mod_seq_length = mod_seq_length
        # Routing slots per expert (+ no-op) since the last heatmap; not part of the state dict.
        self.routing_counts: Optional[torch.Tensor] = None

    # -- routing
    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        if recompute_pass(self.training) is Pass.FIRST:
            # A recomputed layer (model.recompute) records in its recompute, like megatron's router
            # logs its aux loss there: once per micro-batch (recompute.py).
            return probs, routing_map
        training = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            self._record(hidden_states, routing_map, training)
        return probs, routing_map

    def _record(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, training: bool) -> None:
        prefix = moe_layer_prefix(self.layer_number)
        counts = routing_map.sum(dim=0, dtype=torch.float32)  # [experts (+ no-op)]
        slots = float(routing_map.size(0) * self.config.moe_router_topk)
        share = counts / max(slots, 1.0)
        n_real = counts.numel() - self.num_noop_experts
        stats: Dict[str, torch.Tensor] = {f"{prefix}/load_e{i}": share[i] for i in range(n_real)}
        real = share[:n_real]
        stats[f"{prefix}/load_max"] = real.max() / real.sum().clamp(min=1e-12) * n_real
        if self.config.moe_expert_capacity_factor is not None:
            stats[f"{prefix}/dropped_frac"] = 1.0 - share.sum()
        aux, z = getattr(self.router, "last_aux_loss", None), getattr(self.router, "last_z_loss", None)
        if aux is not None and training:
            stats[f"{prefix}/aux_loss"] = aux
        if z is not None:
            stats[f"{prefix}/z_loss"] = z
        bias = getattr(self.router, "expert_bias", None)
        if bias is not None:  # load_balancing=expert_bias: how far the bias has moved the selection
            stats[f"{prefix}/expert_bias_max_abs"] = bias[:n_real].abs().max()
        stats.update(self._extra_stats(prefix, share, hidden_states))
        self.router.last_aux_loss = self.router.last_z_loss = None
        self.publish_stats(stats)
        if training:
            if self.routing_counts is None or self.routing_counts.device != counts.device:
                self.routing_counts = torch.zeros_like(counts, dtype=torch.float64)
            self.routing_counts += counts

    def _extra_stats(self, prefix: str, share: torch.Tensor, hidden_states: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.mod_seq_length:
            return {}
        # Staged MoDE: this layer sees only the tokens its MoD router selected ([k, b, h], split
        # over TP under sequence parallelism).
        sp = self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1
        seen = hidden_states.size(0) * (self.config.tensor_model_parallel_size if sp else 1)
        return {f"{prefix}/skip_frac": torch.tensor(1.0 - seen / self.mod_seq_length, device=share.device)}


# ----------------------------------------------------------------------------- experts
def _expert_seed(layer_seed: int, global_expert: int, linear: int) -> int:
    return (layer_seed * 1_000_003 + global_expert * 7 + linear) % (2**63 - 1)


def _redraw_linear(linear: torch.nn.Module, init_method, seed: int, tp_rank: int, tp_size: int) -> None:
    """Re-draw a (column- or row-) parallel linear's weight as megatron's CPU initialisation does
    (the full master weight, then this rank's TP slice), from a generator seeded with ``seed``."""
    weight = linear.weight
    _redraw_weight(weight, init_method, seed, tp_rank, tp_size, getattr(weight, "partition_dim", 0),
                   getattr(weight, "partition_stride", 1),
                   getattr(weight, "tensor_model_parallel", False) and tp_size > 1)
    bias = getattr(linear, "bias", None)
    if isinstance(bias, torch.Tensor):
        with torch.no_grad():
            bias.zero_()


def _redraw_weight(weight: torch.Tensor, init_method, seed: int, tp_rank: int, tp_size: int, partition_dim: int,
                   stride: int, tensor_parallel: bool) -> None:
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    world = tp_size if tensor_parallel else 1
    full = list(weight.shape)
    full[partition_dim] *= world
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        _initialize_affine_weight_cpu(
            weight, full[0], full[1], weight.shape[partition_dim], partition_dim, init_method, stride=stride,
            params_dtype=weight.dtype, rank=tp_rank if tensor_parallel else 0, world_size=world,
            skip_set_tensor_parallel_attributes=True)


class _LayoutIndependentExperts:
    """Mixin for megatron's expert modules: build them as megatron does, then redraw every local
    expert from a seed of its GLOBAL index, so the experts do not depend on the EP (or TP) layout.
    List it before the megatron class: ``super().__init__`` is then the megatron constructor."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        from megatron.core.utils import get_pg_rank, get_pg_size

        # One draw from the default stream, identical for every EP size: the layer's expert seed.
        layer_seed = int(torch.randint(0, 2**62, (1,)).item())
        with torch.random.fork_rng(devices=[]):
            super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if not self.config.perform_initialization:
            return
        first = get_pg_rank(self.ep_group) * num_local_experts
        tp_rank, tp_size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        for local in range(num_local_experts):
            self.redraw_expert(local, first + local, layer_seed, tp_rank, tp_size)

    def redraw_expert(self, local: int, g: int, layer_seed: int, tp_rank: int, tp_size: int) -> None:
        raise NotImplementedError


class SeededSequentialMLP(_LayoutIndependentExperts, SequentialMLP):
    """megatron's SequentialMLP whose experts are drawn independently of the EP layout."""

    def redraw_expert(self, local, g, layer_seed, tp_rank, tp_size):
        expert = self.local_experts[local]
        _redraw_linear(expert.linear_fc1, self.config.init_method, _expert_seed(layer_seed, g, 1), tp_rank, tp_size)
        _redraw_linear(expert.linear_fc2, self.config.output_layer_init_method, _expert_seed(layer_seed, g, 2),
                       tp_rank, tp_size)


class SeededTEGroupedMLP(_LayoutIndependentExperts, TEGroupedMLP):
    """megatron's grouped-GEMM experts (``model.moe.grouped_gemm``, see expert_mlp.py) drawn like
    :class:`SeededSequentialMLP`: expert g's fc1/fc2 get the same weights as sequential expert g
    (same seeds, megatron's CPU initialisation, the SwiGLU fc1 interleaved with stride 2 as
    megatron's MLP does), so grouped and sequential models start equal under every EP size."""

    def redraw_expert(self, local, g, layer_seed, tp_rank, tp_size):
        fc1_stride = 2 if self.config.gated_linear_unit else 1
        # TE's grouped linears hold one weight per local expert, already this rank's TP slice:
        # fc1 column-parallel (rows split), fc2 row-parallel (columns split).
        _redraw_weight(getattr(self.linear_fc1, f"weight{local}"), self.config.init_method,
                       _expert_seed(layer_seed, g, 1), tp_rank, tp_size, 0, fc1_stride, tp_size > 1)
        _redraw_weight(getattr(self.linear_fc2, f"weight{local}"), self.config.output_layer_init_method,
                       _expert_seed(layer_seed, g, 2), tp_rank, tp_size, 1, 1, tp_size > 1)


# ----------------------------------------------------------------------------- spec
class _KnownMoELayerFilter(logging.Filter):
    """megatron's TransformerLayer passes its process groups only to MLP classes it knows by
    identity and warns "Unknown MLP type" for subclasses such as ours, which then take megatron's
    default process groups: the ones the layer itself uses here (models are built without a custom
    pg_collection). Drop exactly that warning while our MoE specs are in use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type:")


def _silence_unknown_mlp_warning() -> None:
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _KnownMoELayerFilter) for f in logger.filters):
        logger.addFilter(_KnownMoELayerFilter())


def moe_mlp_spec(mlp_spec, layer_cls=ObservedMoELayer, router_cls=ObservedRouter,
                 mod_seq_length: Optional[int] = None):
    """megatron's MoE MLP spec with our layer, router and EP-independent experts."""
    _silence_unknown_mlp_warning()
    spec = copy.deepcopy(mlp_spec)
    spec.module = layer_cls
    spec.submodules.router = router_cls
    experts = spec.submodules.experts
    if getattr(experts, "module", None) is SequentialMLP:
        experts.module = SeededSequentialMLP
    elif getattr(experts, "module", None) is TEGroupedMLP:
        experts.module = SeededTEGroupedMLP
    if mod_seq_length:
        spec.params = {**(spec.params or {}), "mod_seq_length": mod_seq_length}
    return spec


# ----------------------------------------------------------------------------- routing loads
def moe_layers(chunks: Sequence[torch.nn.Module]) -> List[ObservedMoELayer]:
    return [m for c in chunks for m in c.modules() if isinstance(m, ObservedMoELayer)]


def gather_routing_loads(chunks: Sequence[torch.nn.Module], num_layers: int, num_columns: int,
                         device: Union[torch.device, str]) -> Dict[int, List[float]]:
    """Share of routing slots per expert (columns; the no-op last) of every MoE layer since the
    last call, over all ranks. A collective over the default group: call it on every rank.
    Returns {1-based layer number: shares} (the same on every rank); resets the counts."""
    import torch.distributed as dist

    table = torch.zeros(num_layers, num_columns, dtype=torch.float64, device=device)
    for m in moe_layers(chunks):
        if m.routing_counts is not None:
            n = m.routing_counts.numel()
            table[m.layer_number - 1, :n] += m.routing_counts.to(device)
            m.routing_counts.zero_()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    totals = table.sum(dim=1, keepdim=True)
    shares = (table / totals.clamp(min=1e-12)).cpu()
    return {i + 1: shares[i].tolist() for i in range(num_layers) if float(totals[i]) > 0}
