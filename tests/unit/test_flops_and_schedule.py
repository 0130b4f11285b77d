import math

import pytest

from mod_train.config.schema import ModelConfig, ModConfig, OptimConfig
from mod_train.engine.lr_schedule import lr_at
from mod_train.model.flops import forward_flops_per_token, train_flops_per_token


def test_dense_flops_match_hand_count():
    # h=64, heads=4 (MHA), s=32, gelu ffn=256, 2 layers, vocab 128
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, activation="gelu")
    h, s, f, V = 64, 32, 256, 128
    per_layer = 2 * h * 3 * h + 2 * h * h + 4 * s * h + 2 * 2 * h * f
    expected = 2 * per_layer + 2 * h * V
    assert forward_flops_per_token(m, f, V, [], [], []) == expected
    assert train_flops_per_token(m, f, V, [], [], []) == 3 * expected


def test_mod_flops_count_routed_tokens_and_router():
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, activation="swiglu",
                    mod=ModConfig(enabled=True))
    h, s, f, V = 64, 32, 192, 128
    dense_layer = 2 * h * 3 * h + 2 * h * h + 4 * s * h + 2 * 3 * h * f
    c = 4 / 32  # k = round(0.125 * 32) = 4
    mod_layer = c * (2 * h * 3 * h + 2 * h * h) + c * 4 * (c * s) * h + c * 2 * 3 * h * f + 2 * h
    expected = dense_layer + mod_layer + 2 * h * V
    assert math.isclose(forward_flops_per_token(m, f, V, [1], [0.125], []), expected)
    # capacity 1.0 costs the dense layer plus the router
    assert math.isclose(forward_flops_per_token(m, f, V, [1], [1.0], []), 2 * dense_layer + 2 * h + 2 * h * V)


def test_moe_flops_top_k_experts_and_router():
    m = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=32, activation="gelu")
    m.moe.num_experts, m.moe.top_k = 4, 2
    h, s, f = 64, 32, 256
    expected = 2 * h * 3 * h + 2 * h * h + 4 * s * h + 2 * 2 * 2 * h * f + 2 * h * 4
    assert forward_flops_per_token(m, f, 0, [], [], [0]) == expected


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_lr_schedules(schedule):
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, wsd_decay_fraction=0.2)
    assert lr_at(0, o, 100) == pytest.approx(0.1)
    assert lr_at(9, o, 100) == pytest.approx(1.0)
    if schedule == "constant":
        assert lr_at(99, o, 100) == 1.0
    elif schedule == "cosine":
        assert lr_at(55, o, 100) == pytest.approx(0.55)
        assert lr_at(100, o, 100) == pytest.approx(0.1)
    else:
        assert lr_at(79, o, 100) == 1.0
        assert lr_at(90, o, 100) == pytest.approx(0.55)
        assert lr_at(100, o, 100) == pytest.approx(0.1)
