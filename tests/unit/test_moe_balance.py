"""MoE speed and balance levers (issue 16, lever 2) on real megatron-core modules, one process:
aux-loss-free load balancing with megatron's expert bias, the other load-balancing choices, and
the grouped-GEMM experts (their fallback here; grouped == sequential where TE's kernel exists)."""

import logging

import pytest
import torch

from mod_train.config import ConfigError, validate
from mod_train.config.load import compose, to_config
from mod_train.model.build import transformer_config
from mod_train.model.expert_mlp import grouped_gemm_missing
from mod_train.model.specs import base_layer_spec

S, B, H, E, K = 16, 4, 32, 4, 2


def moe_config(*extra):
    cfg = to_config(compose(["model.vocab_size=128", f"model.hidden_size={H}", "model.num_attention_heads=4",
                             f"model.seq_length={S}", "model.num_layers=2", f"model.moe.num_experts={E}",
                             f"model.moe.top_k={K}", "model.moe.ffn_hidden_size=48", *extra]))
    return cfg, validate(cfg, world_size=1, check_files=False, has_cuda=False)


def make_layer(*extra):
    cfg, d = moe_config(*extra)
    spec = base_layer_spec(cfg.model, moe=True).submodules.mlp
    torch.manual_seed(0)
    layer = spec.module(config=transformer_config(cfg, d), submodules=spec.submodules, **spec.params)
    layer.set_layer_number(1)
    return layer


def sigmoid_reference(layer, x):
    """megatron's expert-bias routing written out: top-k of sigmoid(logits) + bias picks the experts,
    the combine weights are the picked *unbiased* sigmoid scores, normalised over the k."""
    flat = x.reshape(-1, H)
    scores = torch.sigmoid(flat @ layer.router.weight.t())
    idx = (scores + layer.router.expert_bias).topk(K, dim=-1).indices
    picked = scores.gather(1, idx)
    weights = picked / picked.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for j in range(K):
            out[t] += weights[t, j] * layer.experts.local_experts[int(idx[t, j])](flat[t:t + 1])[0][0]
    return out.view_as(x), idx


def test_expert_bias_balances_load_and_only_changes_the_selection(megatron_tp1):
    from mod_train.model.expert_bias import ExpertBiasUpdater

    layer = make_layer("model.moe.load_balancing=expert_bias", "model.moe.bias_update_rate=0.02")
    router = layer.router
    assert router.score_function == "sigmoid" and router.routing_type == "none"
    assert "router.expert_bias" in layer.state_dict()  # persistent: saved and resumed with the model
    assert any(k.endswith("router.expert_bias") for k in layer.sharded_state_dict())  # ... and resharded
    updater = ExpertBiasUpdater([layer])
    assert updater.routers == [router]
    layer.train()
    torch.manual_seed(1)
    x = torch.randn(S, B, H)
    # A skewed router: expert 0 is everybody's favourite.
    with torch.no_grad():
        router.weight[0] = x.reshape(-1, H).mean(0) * 4

    def load_max():
        with torch.no_grad():
            counts = layer.route(x.reshape(-1, H).view(S, B, H))[1].sum(0).float()
        return float(counts.max() / counts.mean())

    start = load_max()
    assert start > 1.5
    router.local_tokens_per_expert.zero_()  # load_max ran under no_grad: nothing was counted
    # A skipped step: its counts are dropped, the bias stays.
    layer(x)[0].sum().backward()
    assert float(router.local_tokens_per_expert.sum()) == S * B * K
    updater.discard()
    assert float(router.local_tokens_per_expert.sum()) == 0 and float(router.expert_bias.abs().sum()) == 0
    # Applied steps: the bias moves by the rate towards the mean load (down for the overloaded expert).
    for step in range(60):
        layer(x)[0].sum().backward()
        counts = router.local_tokens_per_expert.clone()
        before = router.expert_bias.clone()
        updater.update()
        assert float(router.local_tokens_per_expert.sum()) == 0
        want = before + 0.02 * torch.sign(counts.mean() - counts)
        assert torch.equal(router.expert_bias, want), step
    assert float(router.expert_bias[0]) < 0
    end = load_max()
    assert end < 1.25 < start, (start, end)
    assert layer.routing_stats()["moe/layer1/expert_bias_max_abs"] == pytest.approx(
        float(router.expert_bias.abs().max()))
    # The bias picks the experts; the output weights them by their unbiased scores.
    with torch.no_grad():
        out, _ = layer(x)
        want, idx = sigmoid_reference(layer, x)
        _, unbiased_idx = (torch.sigmoid(x.reshape(-1, H) @ router.weight.t())).topk(K, dim=-1)
    assert not torch.equal(idx.sort(-1).values, unbiased_idx.sort(-1).values)  # the bias did change choices
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_integrated_mode_balances_its_noop_columns_like_experts(megatron_tp1):
    """Integrated MoDE with expert bias: the no-op columns get a bias too (the router scores E + n
    columns, as the aux loss treats them), counted before the no-op slots are dropped."""
    from mod_train.model.expert_bias import ExpertBiasUpdater

    layer = make_layer("model.moe.mode=integrated", "model.moe.load_balancing=expert_bias")
    n = K  # default no-op columns: top_k
    assert layer.router.expert_bias.shape == (E + n,)
    layer.train()
    layer(torch.randn(S, B, H))[0].sum().backward()
    counts = layer.router.local_tokens_per_expert.clone()
    assert float(counts.sum()) == S * B * K and float(counts[E:].sum()) > 0
    ExpertBiasUpdater([layer]).update()
    torch.testing.assert_close(layer.router.expert_bias, 1e-3 * torch.sign(counts.mean() - counts))
    assert "moe/layer1/expert_bias_max_abs" in layer.routing_stats()


@pytest.mark.parametrize("choice,megatron_type,coeff_used", [
    ("aux_loss", "aux_loss", True), ("seq_aux_loss", "seq_aux_loss", True), ("none", "none", False)])
def test_loss_based_choices_map_to_megatron(megatron_tp1, choice, megatron_type, coeff_used):
    layer = make_layer(f"model.moe.load_balancing={choice}")
    assert layer.router.routing_type == megatron_type and layer.router.score_function == "softmax"
    assert layer.router.expert_bias is None
    assert layer.router.is_aux_loss_enabled() is coeff_used
    layer.train()
    x = torch.randn(S, B, H, requires_grad=True)
    layer(x)[0].sum().backward()
    stats = layer.routing_stats()
    assert ("moe/layer1/aux_loss" in stats) is coeff_used and "moe/layer1/expert_bias_max_abs" not in stats


def check(*overrides):
    return validate(to_config(compose(["model.vocab_size=500", *overrides])), world_size=1, check_files=False,
                    has_cuda=False)


@pytest.mark.parametrize("overrides,needle", [
    (["model=tiny_moe", "model.moe.load_balancing=expert_bias", "model.moe.bias_update_rate=0"],
     "needs model.moe.bias_update_rate > 0"),
    (["model=tiny_moe", "model.moe.load_balancing=expert_bias", "model.moe.bias_update_rate=-0.001"],
     "needs model.moe.bias_update_rate > 0"),
    (["model=tiny_moe", "model.moe.load_balancing=sinkhorn"], "expert_bias"),  # OmegaConf lists the choices
    (["model=tiny", "model.moe.load_balancing=expert_bias"], "set model.moe.num_experts > 0"),
    (["model=tiny", "model.moe.grouped_gemm=true"], "set model.moe.num_experts > 0"),
])
def test_bad_balance_configs_are_rejected(overrides, needle):
    with pytest.raises((ConfigError, Exception)) as e:
        check(*overrides)
    assert needle in str(e.value)


def test_integrated_mode_and_seq_aux_loss_configs_are_accepted():
    check("model=tiny_mode_integrated", "model.moe.load_balancing=expert_bias")
    check("model=tiny_moe", "model.moe.load_balancing=seq_aux_loss", "model.moe.grouped_gemm=true")


@pytest.mark.skipif(grouped_gemm_missing() is None, reason="this machine has TE's grouped GEMM: no fallback")
def test_grouped_gemm_falls_back_to_sequential_experts_and_says_why(megatron_tp1, caplog):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from mod_train.model.build import build_model_chunks

    cfg, d = moe_config("model.moe.grouped_gemm=true")
    with caplog.at_level(logging.WARNING, logger="mod_train.model.build"):
        chunks = build_model_chunks(cfg, d)
    experts = [m for m in chunks[0].modules() if isinstance(m, SequentialMLP)]
    assert len(experts) == 2 and not chunks[0].config.moe_grouped_gemm
    lines = [r.getMessage() for r in caplog.records if "grouped_gemm" in r.getMessage()]
    assert lines == [f"model.moe.grouped_gemm=true: falling back to the sequential experts (megatron-core "
                     f"SequentialMLP): {grouped_gemm_missing()}"]
    assert "transformer_engine is not importable" in lines[0] or "CUDA" in lines[0]


@pytest.mark.skipif(grouped_gemm_missing() is not None, reason=f"no grouped GEMM here: {grouped_gemm_missing()}")
def test_grouped_experts_equal_sequential_experts(megatron_tp1):
    """TEGroupedMLP and SequentialMLP drawn from the same seed: same weights, same output and
    gradients (fp32) on the same tokens."""
    from mod_train.model.moe import SeededTEGroupedMLP

    grouped, sequential = make_layer("model.moe.grouped_gemm=true"), make_layer()
    assert isinstance(grouped.experts, SeededTEGroupedMLP)
    grouped.cuda(), sequential.cuda()
    sd_g, sd_s = grouped.sharded_state_dict(), sequential.sharded_state_dict()
    for key in ("experts.experts.linear_fc1.weight", "experts.experts.linear_fc2.weight"):
        g = sorted((v.global_offset, v.data) for k, v in sd_g.items() if k.endswith(key) and hasattr(v, "data"))
        s = sorted((v.global_offset, v.data) for k, v in sd_s.items() if k.endswith(key) and hasattr(v, "data"))
        assert len(g) == len(s) == E
        for (og, tg), (os_, ts) in zip(g, s):
            assert og == os_ and torch.equal(tg, ts)
    x = torch.randn(S, B, H, device="cuda")
    outs = []
    for layer in (grouped, sequential):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)[0]
        out.sum().backward()
        outs.append((out.detach(), xi.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_hugging_face_export_refuses_expert_bias_routing():
    from mod_train.hf.export import HFExportError, choose_target

    cfg = to_config(compose(["model.vocab_size=500", "model=tiny_moe", "model.moe.load_balancing=expert_bias"]))
    with pytest.raises(HFExportError, match="load_balancing=expert_bias"):
        choose_target(cfg, validate(cfg, world_size=1, check_files=False, has_cuda=False))
    cfg.model.moe.load_balancing = "none"  # softmax top-k: exportable
    choose_target(cfg, validate(cfg, world_size=1, check_files=False, has_cuda=False))
