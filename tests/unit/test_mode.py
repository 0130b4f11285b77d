"""MoE / MoDE layers on real megatron-core modules (single process), MoE config rules, presets."""

import math

import pytest
import torch

from mod_train.config import ConfigError, validate
from mod_train.config.load import compose, to_config
from mod_train.model.build import transformer_config
from mod_train.model.flops import forward_flops_per_token
from mod_train.model.specs import base_layer_spec

S, B, H, E = 16, 2, 32, 4


def make_moe_layer(*extra):
    cfg = to_config(compose(["model.vocab_size=128", f"model.hidden_size={H}", "model.num_attention_heads=4",
                             f"model.seq_length={S}", "model.num_layers=2", f"model.moe.num_experts={E}",
                             "model.moe.ffn_hidden_size=48", *extra]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    spec = base_layer_spec(cfg.model, moe=True).submodules.mlp
    torch.manual_seed(0)
    layer = spec.module(config=transformer_config(cfg, d), submodules=spec.submodules, **spec.params)
    layer.set_layer_number(1)
    return layer


def reference_output(layer, x, k):
    """sum over the token's top-k slots of softmax(selected logits) x expert(x); no-op slots (columns
    E and above) add 0."""
    flat = x.reshape(-1, H)
    logits = flat @ layer.router.weight.t()
    vals, idx = logits.topk(k, dim=-1)
    probs = torch.softmax(vals, dim=-1)
    out = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for j in range(k):
            e = int(idx[t, j])
            if e < E:
                out[t] += probs[t, j] * layer.experts.local_experts[e](flat[t:t + 1])[0][0]
    return out.view_as(x), idx


class DispatchSpy:
    """Counts the (token, expert) slots megatron's experts actually receive."""

    def __init__(self, layer):
        self.slots = []
        forward = layer.experts.forward

        def spy(hidden, tokens_per_expert, probs):
            self.slots.append(int(tokens_per_expert.sum()))
            return forward(hidden, tokens_per_expert, probs)

        layer.experts.forward = spy


@pytest.mark.parametrize("dispatcher,noop", [("alltoall", None), ("allgather", None), ("alltoall", 1)])
def test_integrated_mode_skips_noop_slots_and_matches_reference(megatron_tp1, dispatcher, noop):
    layer = make_moe_layer("model.moe.mode=integrated", "model.moe.top_k=2",
                           f"model.moe.token_dispatcher={dispatcher}", f"model.moe.num_noop_experts={noop or 'null'}")
    n = noop or 2  # default: top_k no-op columns
    assert layer.router.weight.shape == (E + n, H)  # n extra logits: the no-op experts
    spy = DispatchSpy(layer)
    x = torch.randn(S, B, H)
    out, _ = layer(x)
    want, idx = reference_output(layer, x, 2)
    noop_slots = int((idx >= E).sum())
    assert 0 < noop_slots < S * B  # some, not all, tokens use the no-op this time
    assert spy.slots == [S * B * 2 - noop_slots]  # no-op slots are never dispatched or computed
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    stats = layer.routing_stats()
    assert math.isclose(stats["moe/layer1/noop_frac"], noop_slots / (S * B * 2), rel_tol=1e-6)
    assert math.isclose(sum(stats[f"moe/layer1/load_e{i}"] for i in range(E)) + stats["moe/layer1/noop_frac"], 1.0,
                        rel_tol=1e-6)


def test_top1_noop_tokens_keep_their_residual_and_router_learns_the_noop(megatron_tp1):
    layer = make_moe_layer("model.moe.mode=integrated", "model.moe.top_k=1")
    x = torch.randn(S, B, H)
    out, _ = layer(x)
    idx = (x.reshape(-1, H) @ layer.router.weight.t()).argmax(-1).view(S, B)
    skipped = idx == E
    assert skipped.any() and (~skipped).any()
    assert torch.equal(out[skipped], torch.zeros_like(out[skipped]))  # the MoE adds nothing to the residual
    assert (out[~skipped].abs().sum(-1) > 0).all()
    # top-2: the no-op's logit enters the softmax of the selected pair, so the LM loss trains it
    layer = make_moe_layer("model.moe.mode=integrated", "model.moe.top_k=2", "model.moe.aux_loss_coeff=0")
    layer(torch.randn(S, B, H))[0].square().sum().backward()
    assert layer.router.weight.grad[E].abs().sum() > 0


def test_with_top_k_noop_columns_a_token_skips_its_mlp_entirely(megatron_tp1):
    """top_k=2 and (by default) 2 no-op columns: a token whose two best columns are both no-ops is
    never dispatched and gets no MoE output; the FLOP count's no-op share is the measured one."""
    from mod_train.model.mode import drain_noop_share

    layer = make_moe_layer("model.moe.mode=integrated", "model.moe.top_k=2", "model.moe.aux_loss_coeff=0")
    assert layer.num_noop_experts == 2 and layer.router.weight.shape == (E + 2, H)
    x = torch.randn(S, B, H)
    with torch.no_grad():  # both no-op columns score high on tokens whose first feature is positive
        direction = torch.zeros(H)
        direction[0] = 10.0
        layer.router.weight[E:] = layer.router.weight[E:] * 0.01 + direction
    spy = DispatchSpy(layer)
    layer.train()
    out, _ = layer(x)
    want, idx = reference_output(layer, x, 2)
    skipped = (idx >= E).all(-1).view(S, B)  # both slots on no-ops
    assert skipped.any() and (~skipped).any()
    assert torch.equal(out[skipped], torch.zeros_like(out[skipped]))  # nothing added to the residual
    assert (out[~skipped].abs().sum(-1) > 0).all()
    noop_slots = int((idx >= E).sum())
    assert spy.slots == [S * B * 2 - noop_slots]  # skipped tokens are never dispatched
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    # the training forward's no-op share, as the trainer's FLOP count reads it (then reset)
    share = drain_noop_share([layer], num_layers=2, device="cpu")
    assert math.isclose(share, noop_slots / (S * B * 2), rel_tol=1e-12)
    assert math.isclose(layer.routing_stats()["moe/layer1/noop_frac"], share, rel_tol=1e-6)
    assert drain_noop_share([layer], num_layers=2, device="cpu") is None
    layer.eval()
    with torch.no_grad():
        layer(x)  # evaluation is not training compute
    assert drain_noop_share([layer], num_layers=2, device="cpu") is None


def test_moe_layer_stats_and_routing_heatmap(megatron_tp1, tmp_path):
    from mod_train.model.aux_losses import AuxLossRecorder
    from mod_train.model.moe import gather_routing_loads
    from mod_train.tracking.plots import plot_routing_heatmap

    layer = make_moe_layer("model.moe.top_k=2", "model.moe.capacity_factor=1.0", "model.moe.z_loss_coeff=0.001")
    recorder = AuxLossRecorder([layer])
    layer.train()
    x = torch.randn(S, B, H, requires_grad=True)
    layer(x)[0].sum().backward()
    stats = recorder.summary()
    loads = [stats[f"moe/layer1/load_e{i}"] for i in range(E)]
    assert math.isclose(sum(loads) + stats["moe/layer1/dropped_frac"], 1.0, rel_tol=1e-6)
    assert 0.0 <= stats["moe/layer1/dropped_frac"] < 1.0
    assert stats["moe/layer1/aux_loss"] > 0 and stats["moe/layer1/z_loss"] > 0
    assert stats["moe/layer1/load_max"] >= 1.0
    table = gather_routing_loads([layer], num_layers=2, num_columns=E, device="cpu")
    assert list(table) == [1] and math.isclose(sum(table[1]), 1.0)
    assert gather_routing_loads([layer], num_layers=2, num_columns=E, device="cpu") == {}  # counts were reset
    pytest.importorskip("matplotlib")
    png = plot_routing_heatmap(table, tmp_path / "heat.png", [f"e{i}" for i in range(E)])
    assert png is not None and png.stat().st_size > 0


def test_experts_are_drawn_per_global_index_without_moving_the_default_stream(megatron_tp1):
    """Expert i gets the same weights however many experts a rank holds (EP rank 0 holds global
    experts 0..n-1), experts differ, and building them takes one draw from the default generator
    whatever their number, so the rest of the model is drawn alike for every EP size."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from mod_train.model.moe import SeededSequentialMLP

    layer = make_moe_layer()
    assert isinstance(layer.experts, SeededSequentialMLP)

    def build(n):
        torch.manual_seed(1)
        experts = SeededSequentialMLP(n, layer.config, layer.submodules.experts.submodules,
                                      pg_collection=get_default_pg_collection())
        return experts, torch.randn(3)

    (two, after_two), (four, after_four) = build(2), build(4)
    assert torch.equal(after_two, after_four)
    for i in range(2):
        for name in ("linear_fc1", "linear_fc2"):
            assert torch.equal(getattr(two.local_experts[i], name).weight, getattr(four.local_experts[i], name).weight)
    w = [e.linear_fc1.weight for e in four.local_experts]
    assert all(not torch.equal(w[0], v) for v in w[1:])
    std = torch.stack(w).std().item()
    assert math.isclose(std, layer.config.init_method_std, rel_tol=0.1)  # megatron's init method


def check(*overrides, world_size=2):
    return validate(to_config(compose(["model.vocab_size=500", *overrides])), world_size=world_size,
                    check_files=False, has_cuda=False)


@pytest.mark.parametrize("overrides,world,needle", [
    (["model.moe.num_experts=4", "parallel.ep=2"], 3, "parallel.ep=2 must divide"),
    (["model.moe.num_experts=4", "parallel.ep=2", "parallel.zero_stage=3"], 2, "needs parallel.zero_stage=1 or 2"),
    (["model.moe.num_experts=4", "parallel.ep=2", "parallel.zero_stage=0"], 2, "needs parallel.zero_stage=1 or 2"),
    # "model.moe.mode must be none, staged or integrated" (str field) or OmegaConf's "expected one of
    # [none, staged, integrated]" (Enum field): either names the choices
    (["model.moe.num_experts=4", "model.moe.mode=both"], 1, "none, staged"),
    (["model.moe.num_experts=4", "model.moe.mode=staged"], 1, "needs layers that are both MoD and MoE"),
    (["model.moe.mode=integrated"], 1, "model.moe.mode=integrated needs experts"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=0"], 1, "capacity_factor must be > 0"),
    (["model.moe.num_experts=4", "parallel.tp=2"], 2, "need parallel.sequence_parallel=true"),
    (["model=tiny_mode_integrated", "model.moe.top_k=5"], 1, "top_k=5 must be between 1"),
    (["model=tiny_moe", "model.moe.num_noop_experts=2"], 1, "num_noop_experts=2 is only used by integrated"),
    (["model=tiny_mode_integrated", "model.moe.num_noop_experts=0"], 1, "num_noop_experts=0 must be >= 1"),
])
def test_bad_moe_configs_are_rejected(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        check(*overrides, world_size=world)
    assert needle in str(e.value)


@pytest.mark.parametrize("preset,base", [("tiny_moe", "tiny"), ("tiny_mode_staged", "tiny_mod"),
                                         ("tiny_mode_integrated", "tiny"), ("gpt_350m_moe", "gpt_350m"),
                                         ("gpt_350m_mode_staged", "gpt_350m_mod"),
                                         ("gpt_350m_mode_integrated", "gpt_350m")])
def test_presets_match_their_dense_twin_in_active_mlp_parameters(preset, base):
    d, twin = check(f"model={preset}", world_size=1), check(f"model={base}", world_size=1)
    m = to_config(compose(["model.vocab_size=500", f"model={preset}"])).model
    b = to_config(compose(["model.vocab_size=500", f"model={base}"])).model
    assert m.moe.top_k * m.moe.ffn_hidden_size == twin.ffn_hidden_size  # tiny: 2 x 96 == 192
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == \
        (b.num_layers, b.hidden_size, b.num_attention_heads, b.seq_length)
    assert d.moe_layers == list(range(1, m.num_layers, 2)) and d.mod_layers == twin.mod_layers
    if preset == "tiny_mode_staged":
        assert set(d.mod_layers) == set(d.moe_layers)


def test_integrated_mode_flops_scale_with_the_measured_noop_share():
    m = to_config(compose(["model.vocab_size=500", "model=tiny_mode_integrated"])).model
    h, f = m.hidden_size, m.moe.ffn_hidden_size
    full = forward_flops_per_token(m, 192, 512, [], [], [1, 3], noop_fraction=0.0)
    quarter = forward_flops_per_token(m, 192, 512, [], [], [1, 3], noop_fraction=0.25)
    assert math.isclose(full - quarter, 2 * 0.25 * m.moe.top_k * 2 * h * f * 3)
