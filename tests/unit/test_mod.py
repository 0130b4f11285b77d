"""Mixture-of-Depths layer behaviour on real megatron-core layers (single process)."""


import pytest
import torch

from mod_train.config.load import compose, to_config
from mod_train.config.schema import ModConfig
from mod_train.config.validate import validate
from mod_train.model.build import transformer_config
from mod_train.model.mod import MoDTransformerLayer, gather_rope, topk_indices
from mod_train.model.specs import base_layer_spec

S, B, H = 16, 2, 32


def make_layers(capacity: float, router_weight: str = "none", causal: str = "aux_loss"):
    cfg = to_config(compose(["model.vocab_size=128", "model.hidden_size=32", "model.num_attention_heads=4",
                             f"model.seq_length={S}", "model.num_layers=2"]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    tcfg = transformer_config(cfg, d)
    spec = base_layer_spec(cfg.model, moe=False)
    torch.manual_seed(0)
    dense = spec.module(config=tcfg, submodules=spec.submodules, layer_number=1)
    mod = MoDTransformerLayer(config=tcfg, submodules=spec.submodules, layer_number=1, capacity=capacity,
                              mod=ModConfig(enabled=True, router_weight=router_weight, causal=causal), seq_length=S)
    missing, unexpected = mod.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("router.") for k in missing)
    return dense, mod, cfg


def rope_table(cfg):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=cfg.model.hidden_size // cfg.model.num_attention_heads, rotary_percent=1.0)
    return rope(S)  # [S, 1, 1, d]


def test_capacity_one_without_weighting_equals_dense(megatron_tp1):
    dense, mod, cfg = make_layers(1.0, "none")
    x = torch.randn(S, B, H)
    rope = rope_table(cfg)
    want, _ = dense(x, attention_mask=None, rotary_pos_emb=rope)
    got, _ = mod(x, attention_mask=None, rotary_pos_emb=rope)
    assert torch.equal(got, want)


def test_capacity_one_with_sigmoid_weighting_scales_the_dense_update(megatron_tp1):
    # At capacity 1.0 the layer takes its gather-free path; it must still weight the block's
    # update by the router and send gradient to the router.
    dense, mod, cfg = make_layers(1.0, "sigmoid")
    x = torch.randn(S, B, H)
    rope = rope_table(cfg)
    block, _ = dense(x, attention_mask=None, rotary_pos_emb=rope)
    weight = torch.sigmoid(mod.router.scores(x)).detach().t().unsqueeze(-1)  # [S, B, 1]
    got, _ = mod(x, attention_mask=None, rotary_pos_emb=rope)
    torch.testing.assert_close(got, x + weight * (block - x), rtol=1e-6, atol=1e-6)
    got.pow(2).sum().backward()
    assert mod.router.linear.weight.grad.abs().sum() > 0


def test_router_gets_gradient_and_unrouted_tokens_pass_through(megatron_tp1):
    _, mod, cfg = make_layers(0.25, "sigmoid")
    x = torch.randn(S, B, H, requires_grad=True)
    out, _ = mod(x, attention_mask=None, rotary_pos_emb=rope_table(cfg))
    out.pow(2).sum().backward()
    assert mod.router.linear.weight.grad is not None and mod.router.linear.weight.grad.abs().sum() > 0
    idx = topk_indices(mod.router.scores(x.detach()), mod.k_for(S))
    routed = torch.zeros(B, S, dtype=torch.bool).scatter_(1, idx, True).t()  # [S, B]
    assert mod.k_for(S) == 4
    assert torch.equal(out[~routed], x.detach()[~routed])  # skipped tokens ride the residual stream
    assert not torch.allclose(out[routed], x.detach()[routed])


def _inputs_with_fixed_routing(routed_positions):
    """Router reads only feature 0; routed tokens get a large feature 0, so perturbing other
    features never changes the routing."""
    x = torch.randn(S, B, H)
    x[:, :, 0] = -5.0
    for p in routed_positions:
        x[p, :, 0] = 5.0
    return x


def test_routed_tokens_attend_only_to_earlier_routed_tokens(megatron_tp1):
    _, mod, cfg = make_layers(0.25, "none")
    with torch.no_grad():
        mod.router.linear.weight.zero_()
        mod.router.linear.weight[0, 0] = 1.0
    routed = [2, 5, 9, 13]
    x = _inputs_with_fixed_routing(routed)
    rope = rope_table(cfg)
    base, _ = mod(x, attention_mask=None, rotary_pos_emb=rope)

    later = x.clone()
    later[13, :, 1:] += 3.0  # a later routed token
    out, _ = mod(later, attention_mask=None, rotary_pos_emb=rope)
    assert torch.equal(out[:13], base[:13])

    unrouted = x.clone()
    unrouted[3, :, 1:] += 3.0  # an earlier token that is not routed
    out, _ = mod(unrouted, attention_mask=None, rotary_pos_emb=rope)
    assert torch.equal(out[[5, 9, 13]], base[[5, 9, 13]])

    earlier = x.clone()
    earlier[2, :, 1:] += 3.0  # an earlier routed token is visible to later routed ones
    out, _ = mod(earlier, attention_mask=None, rotary_pos_emb=rope)
    assert not torch.allclose(out[[5, 9, 13]], base[[5, 9, 13]])


def test_rotary_embeddings_use_original_positions(megatron_tp1):
    dense, mod, cfg = make_layers(0.25, "none")
    with torch.no_grad():
        mod.router.linear.weight.zero_()
        mod.router.linear.weight[0, 0] = 1.0
    routed = [1, 6, 7, 14]
    x = _inputs_with_fixed_routing(routed)
    rope = rope_table(cfg)
    out, _ = mod(x, attention_mask=None, rotary_pos_emb=rope)
    idx = torch.tensor([routed] * B)
    sub = x[routed]
    at_original, _ = dense(sub, attention_mask=None, rotary_pos_emb=gather_rope(rope, idx))
    at_rank, _ = dense(sub, attention_mask=None, rotary_pos_emb=rope[: len(routed)])
    assert torch.equal(out[routed], at_original)
    assert not torch.allclose(out[routed], at_rank)


@pytest.mark.parametrize("causal", ["aux_loss", "predictor"])
def test_causal_decision_is_trained_and_reported(megatron_tp1, causal):
    _, mod, cfg = make_layers(0.25, "sigmoid", causal)
    x = torch.randn(S, B, H)
    rope = rope_table(cfg)
    opt = torch.optim.Adam([p for n, p in mod.named_parameters() if n.startswith("router.")], lr=0.05)
    first = None
    for _ in range(30):
        out, _ = mod(x, attention_mask=None, rotary_pos_emb=rope)
        # Only the auxiliary BCE drives the router here (the output gradient is zero).
        (out * 0).sum().backward()
        opt.step()
        opt.zero_grad()
        stats = mod.routing_stats()
        first = first or stats
    assert stats["mod/layer1/aux_loss"] < first["mod/layer1/aux_loss"]
    assert stats["mod/layer1/causal_acc"] > 0.9
    if causal == "predictor":
        assert mod.router.linear.weight.grad is None or mod.router.linear.weight.grad.abs().sum() == 0
