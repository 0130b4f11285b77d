"""MoD routing that measures the model it claims to (issue 13, points 2-6 and 8), single process.

fp32 router under bf16, k from the actual sequence length, the calibrated causal threshold, the
detach switch of the auxiliary BCE, and causal evaluation through the training entry point.
"""

import pytest
import torch

from mod_train.config.schema import ModConfig
from mod_train.model.mod import (
    CausalThresholdCalibrator,
    MoDRouter,
    MoDTransformerLayer,
    causal_routing,
    quantile_threshold,
)
from mod_train.model.flops import routed_tokens
from tests.unit.test_mod import B, H, S, make_layers, rope_table


# ----------------------------------------------------------------------------- point 4: fp32 routers
def test_mod_router_computes_in_fp32_from_bf16_weights(megatron_tp1):
    torch.manual_seed(0)
    router = MoDRouter(1024, ModConfig(enabled=True), init_std=0.02).bfloat16()
    assert router.causal_threshold.dtype == torch.float32  # the calibrated threshold stays fp32
    x = torch.randn(2048, 1, 1024).bfloat16()
    logits = router.scores(x)
    assert logits.dtype == torch.float32
    want = (x.float().squeeze(1) @ router.linear.weight.float().t()).squeeze(-1)
    torch.testing.assert_close(logits[0], want, rtol=1e-5, atol=1e-5)
    # What a bf16 matmul gives instead: at this size about half the logits tie, so top-k
    # membership at the boundary would be arbitrary.
    bf16 = (x.squeeze(1) @ router.linear.weight.t()).squeeze(-1)
    assert bf16.unique().numel() < 0.75 * bf16.numel()
    assert logits.unique().numel() > 0.99 * logits.numel()


def test_predictor_runs_in_fp32_too(megatron_tp1):
    router = MoDRouter(64, ModConfig(enabled=True, causal="predictor"), init_std=0.02).bfloat16()
    x = torch.randn(16, 2, 64).bfloat16()
    assert router.causal_logits(x, router.scores(x)).dtype == torch.float32


def test_moe_router_logits_are_fp32_under_bf16(megatron_tp1):
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.model.build import transformer_config

    cfg = to_config(compose(["model=tiny_moe", "model.vocab_size=128", "train.precision=bf16"]))
    tcfg = transformer_config(cfg, validate(cfg, world_size=1, check_files=False, has_cuda=False))
    assert tcfg.moe_router_dtype == "fp32"


# ----------------------------------------------------------------------------- point 6: k from the length
@pytest.mark.parametrize("capacity", [0.125, 0.5, 1.0])
def test_k_follows_the_sequence_length(megatron_tp1, capacity):
    _, mod, cfg = make_layers(capacity, "sigmoid")
    rope = rope_table(cfg)
    for length in (1, 2, 5, 8, S):
        x = torch.randn(length, B, H)
        out, _ = mod(x, attention_mask=None, rotary_pos_emb=rope[:length])
        changed = (out != x).any(-1)  # [length, B]: tokens the block touched
        assert changed.sum(0).tolist() == [routed_tokens(capacity, length)] * B, (capacity, length)


def test_routed_tokens_is_at_least_one():
    assert routed_tokens(0.125, 1) == 1 and routed_tokens(0.125, 16) == 2 and routed_tokens(0.125, 2048) == 256


# ----------------------------------------------------------------------------- point 3: calibration
def test_quantile_threshold_routes_the_share():
    v = torch.randn(4, 1000)
    t = quantile_threshold(v, 0.125)
    assert int((v > t).sum()) == 500


def test_calibrated_threshold_makes_the_causal_share_match_capacity(megatron_tp1):
    # A router whose causal logits are mostly negative: `logit > 0` routes far fewer tokens than
    # top-k; the calibrated threshold brings the causal share to the capacity.
    _, mod, cfg = make_layers(0.25, "sigmoid")
    mod.router.threshold_update_rate = 0.5
    calibrator = CausalThresholdCalibrator([mod])
    rope = rope_table(cfg)
    mod.train()
    torch.manual_seed(1)
    with torch.no_grad():
        mod.router.linear.weight.fill_(0.0)
        mod.router.linear.weight[0, 0] = 1.0
    shares = []
    for _ in range(12):
        x = torch.randn(S, B, H)
        x[:, :, 0] -= 1.0  # logits ~ N(-1, 1): logit > 0 routes ~16%, top-k routes 25%
        mod(x, attention_mask=None, rotary_pos_emb=rope)
        calibrator.update()
        shares.append(mod.routing_stats()["mod/layer1/causal_routed_frac"])
    assert shares[0] < 0.2  # before calibration: threshold 0
    assert abs(sum(shares[-4:]) / 4 - 0.25) < 0.06
    stats = mod.routing_stats()
    assert {"mod/layer1/causal_precision", "mod/layer1/causal_recall", "mod/layer1/causal_threshold",
            "mod/layer1/causal_routed_vs_capacity"} <= set(stats)
    assert stats["mod/layer1/causal_threshold"] < -0.2


def test_threshold_is_saved_with_the_weights_and_used_by_the_causal_decision(megatron_tp1):
    _, mod, cfg = make_layers(0.25, "sigmoid")
    mod.router.causal_threshold.fill_(1e9)
    assert "router.causal_threshold" in mod.state_dict()
    x = torch.randn(S, B, H)
    with causal_routing([mod]):
        out, _ = mod(x, attention_mask=None, rotary_pos_emb=rope_table(cfg))
    assert torch.equal(out, x)  # nothing clears the threshold: every token skips the layer
    _, other, _ = make_layers(0.25, "sigmoid")
    other.load_state_dict(mod.state_dict())
    assert float(other.router.causal_threshold) == 1e9


def test_checkpoints_from_before_calibration_load_with_threshold_zero(megatron_tp1):
    _, mod, _ = make_layers(0.25, "sigmoid")
    old = {k: v for k, v in mod.state_dict().items() if not k.endswith("causal_threshold")}
    mod.router.causal_threshold.fill_(3.0)
    mod.load_state_dict(old)  # strict
    assert float(mod.router.causal_threshold) == 0.0


def test_a_skipped_steps_observations_never_reach_the_threshold(megatron_tp1):
    _, mod, _ = make_layers(0.25, "sigmoid")
    calibrator = CausalThresholdCalibrator([mod])
    mod.router.observe(torch.full((2, 16), float("nan")), 0.25)  # the forward of a NaN step
    calibrator.discard()  # its update was skipped
    mod.router.observe(torch.arange(32.0).view(2, 16), 0.25)
    calibrator.update()
    assert torch.isfinite(mod.router.causal_threshold)
    assert float(mod.router.causal_threshold) == pytest.approx(0.05 * 23.5)


def test_no_calibration_when_the_rate_is_zero(megatron_tp1):
    router = MoDRouter(8, ModConfig(enabled=True, threshold_update_rate=0.0), init_std=0.02)
    router.observe(torch.randn(2, 8), 0.25)
    assert router.take_observed() is None


# ----------------------------------------------------------------------------- point 8: detach switch
@pytest.mark.parametrize("detach", [False, True])
def test_aux_loss_gradient_reaches_the_residual_stream_only_without_detach(megatron_tp1, detach):
    cfg = ModConfig(enabled=True, causal="aux_loss", aux_loss_detach_input=detach)
    router = MoDRouter(H, cfg, init_std=0.5)
    x = torch.randn(S, B, H, requires_grad=True)
    logits = router.scores(x)
    causal = router.causal_logits(x, logits)  # the BCE is the only loss here
    target = (logits.detach() > logits.detach().median()).float()
    torch.nn.functional.binary_cross_entropy_with_logits(causal, target).backward()
    assert router.linear.weight.grad.abs().sum() > 0  # the router still learns the decision
    if detach:
        assert x.grad is None or x.grad.abs().sum() == 0
    else:
        assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- point 2: causal evaluation
def _tiny_mod_model():
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate
    from mod_train.model.build import build_model_chunks

    cfg = to_config(compose(["model=tiny_mod", "model.vocab_size=128", "model.seq_length=32",
                             "model.mod.capacity=0.25"]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    torch.manual_seed(0)
    model = build_model_chunks(cfg, d)[0]
    model.eval()
    with torch.no_grad():  # clear-cut routing decisions
        for m in model.modules():
            if isinstance(m, MoDTransformerLayer):
                m.router.linear.weight.mul_(100.0)
    return model


def test_causal_routing_makes_validation_causal(megatron_tp1):
    model = _tiny_mod_model()
    tokens = torch.randint(0, 128, (1, 32))
    pos = torch.arange(32).unsqueeze(0)
    changed_last = tokens.clone()
    changed_last[0, -1] = (tokens[0, -1] + 1) % 128

    def logits(t):
        with torch.no_grad():
            return model(t, pos, None)[0, :-1]

    with causal_routing([model]):
        assert torch.equal(logits(tokens), logits(changed_last))  # causal: the past ignores the future
    # Top-k (as trained) is not causal: the last token moves the selection of earlier positions.
    differs = False
    for seed in range(5):
        torch.manual_seed(seed)
        tokens = torch.randint(0, 128, (1, 32))
        changed_last = tokens.clone()
        changed_last[0, -1] = (tokens[0, -1] + 7) % 128
        differs |= not torch.equal(logits(tokens), logits(changed_last))
    assert differs


def test_a_whole_mod_model_trains_in_fp32_routing(megatron_tp1):
    # Four layers (MoD at 1 and 3): the input of layer 3 comes from a MoD layer's scatter through a
    # dense layer, a non-contiguous tensor that megatron's router gating cannot flatten by itself.
    model = _tiny_mod_model()
    model.train()
    tokens = torch.randint(0, 128, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    routers = [m.router for m in model.modules() if isinstance(m, MoDTransformerLayer)]
    assert len(routers) == 2 and all(r.linear.weight.grad.abs().sum() > 0 for r in routers)
