import math
from types import SimpleNamespace

import pytest

from mod_train.config import validate
from mod_train.config.load import compose, to_config
from mod_train.config.schema import ModelConfig, ModConfig, OptimConfig
from mod_train.engine.lr_schedule import lr_at
from mod_train.model.flops import forward_flops_per_token, train_flops_per_token


# ---------------------------------------------------------------------------------------------
# An independent reference: Megatron-LM's FLOP count, transcribed from num_floating_point_operations
# in megatron/training/training.py (Megatron-LM core_v0.16.1; its `transformer_flops` branch, read
# from a stored copy of the NVIDIA/Megatron-LM repository), keeping the branches these models take
# (no multi-latent attention, no linear-attention layers, no latent MoE, no hybrid/Mamba) and
# asserting the others are off. megatron/training is not part of the megatron-core wheel.
def megatron_num_floating_point_operations(args, batch_size):
    assert not args.multi_latent_attention and args.experimental_attention_variant is None
    assert args.moe_latent_size is None
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.num_experts is None:
        num_dense_layers = args.num_layers
        num_moe_layers = 0
        num_experts_routed_to = 0
        last_layer_is_moe = 0
    else:
        if isinstance(args.moe_layer_freq, int):
            moe_layer_pattern = [1 if (i % args.moe_layer_freq == 0) else 0 for i in range(args.num_layers)]
        else:
            moe_layer_pattern = args.moe_layer_freq
        assert len(moe_layer_pattern) == args.num_layers
        num_moe_layers = sum(moe_layer_pattern)
        num_dense_layers = args.num_layers - num_moe_layers
        num_experts_routed_to = args.moe_router_topk
        last_layer_is_moe = moe_layer_pattern[-1]
    if args.mtp_num_layers is not None:
        mtp_num_layers = args.mtp_num_layers
        num_moe_layers += last_layer_is_moe * mtp_num_layers
        num_dense_layers += (1 - last_layer_is_moe) * mtp_num_layers
        num_layers = args.num_layers + mtp_num_layers
    else:
        mtp_num_layers = 0
        num_layers = args.num_layers
    moe_ffn_hidden_size = args.moe_ffn_hidden_size if args.moe_ffn_hidden_size is not None else args.ffn_hidden_size
    shared_expert_ffn_hidden_size = (0 if args.moe_shared_expert_intermediate_size is None
                                     else args.moe_shared_expert_intermediate_size)
    forward_backward_expansion_factor = 3
    fma_expansion_factor = 2
    ffn_expansion_factor = 3 if args.swiglu else 2
    query_projection_size = args.kv_channels * args.num_attention_heads
    key_projection_size = args.kv_channels * args.num_query_groups
    value_projection_size = args.kv_channels * args.num_query_groups
    gate_projection_size = query_projection_size if args.attention_output_gate else 0
    standard_self_attn_term = (
        forward_backward_expansion_factor
        * fma_expansion_factor
        * (
            args.hidden_size
            * (query_projection_size + key_projection_size + value_projection_size + gate_projection_size)
            + query_projection_size * args.seq_length / 2 * 2  # causal mask; QK^T and (QK^T)V
            + query_projection_size * args.hidden_size
        )
    )
    self_attn_term = standard_self_attn_term * num_layers
    return (
        batch_size
        * args.seq_length
        * (
            forward_backward_expansion_factor
            * fma_expansion_factor
            * args.hidden_size
            * (
                (args.ffn_hidden_size * ffn_expansion_factor) * num_dense_layers
                + (moe_ffn_hidden_size * num_experts_routed_to * ffn_expansion_factor) * num_moe_layers
                + (shared_expert_ffn_hidden_size * ffn_expansion_factor) * num_moe_layers
            )
            + self_attn_term
            + forward_backward_expansion_factor * fma_expansion_factor * mtp_num_layers
            * (3 * args.hidden_size + 2 * args.hidden_size * args.hidden_size)
            + forward_backward_expansion_factor * fma_expansion_factor * args.hidden_size
            * args.padded_vocab_size * (mtp_num_layers + 1)
        )
    )


def megatron_args(m, tp=1):
    """Megatron-LM's arguments for one of our model configs, as its argument parser derives them."""
    swiglu = m.activation == "swiglu"
    ffn = m.ffn_hidden_size or (((int(8 * m.hidden_size / 3) + 63) // 64) * 64 if swiglu else 4 * m.hidden_size)
    multiple = m.make_vocab_size_divisible_by * tp  # Megatron's _vocab_size_with_padding
    moe = m.moe.num_experts > 0
    pattern = [1 if i in (m.moe.layers or range(m.moe.offset, m.num_layers, m.moe.every)) else 0
               for i in range(m.num_layers)]
    return SimpleNamespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn, seq_length=m.seq_length,
        num_attention_heads=m.num_attention_heads, kv_channels=m.hidden_size // m.num_attention_heads,
        group_query_attention=m.num_query_groups is not None, num_query_groups=m.num_query_groups,
        swiglu=swiglu, padded_vocab_size=-(-m.vocab_size // multiple) * multiple,
        num_experts=m.moe.num_experts if moe else None, moe_layer_freq=pattern, moe_router_topk=m.moe.top_k,
        moe_ffn_hidden_size=m.moe.ffn_hidden_size, moe_shared_expert_intermediate_size=m.moe.shared_expert_ffn_hidden_size,
        moe_latent_size=None, mtp_num_layers=None, multi_latent_attention=False, attention_output_gate=False,
        experimental_attention_variant=None)


def ours(preset, *overrides):
    cfg = to_config(compose([f"model={preset}", "model.vocab_size=32000", *overrides]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    return cfg.model, d, train_flops_per_token(cfg.model, d.ffn_hidden_size, d.padded_vocab_size, d.mod_layers,
                                               d.mod_capacities, d.moe_layers)


@pytest.mark.parametrize("preset,overrides", [
    ("gpt_125m", []), ("gpt_350m", []), ("gpt_1b", []), ("gpt_350m_moe", []),
    # the other branches of the formula: GQA, gelu, a shared expert, an explicit layer list
    ("gpt_350m", ["model.num_query_groups=4", "model.activation=gelu"]),
    ("gpt_350m_moe", ["model.moe.shared_expert_ffn_hidden_size=512", "model.moe.top_k=1", "model.moe.layers=[0,5]"]),
])
def test_flops_per_token_equal_megatron_lm_to_the_digit(preset, overrides):
    model, _, flops = ours(preset, *overrides)
    batch = 3
    reference = megatron_num_floating_point_operations(megatron_args(model), batch) / (batch * model.seq_length)
    assert flops == reference, (flops, reference, flops / reference)


def test_causal_attention_counts_half_the_score_matrix():
    """Doubling the sequence adds 3 x 2 x h x s/2 x 2 per token and layer (the causal half), not twice that."""
    model, _, short = ours("gpt_125m")
    _, _, long = ours("gpt_125m", f"model.seq_length={2 * model.seq_length}")
    h, s, layers = model.hidden_size, model.seq_length, model.num_layers
    assert long - short == layers * 3 * 2 * h * (2 * s - s)


def test_mod_flops_count_routed_tokens_causally_among_themselves_and_the_router():
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, activation="swiglu",
                    mod=ModConfig(enabled=True))
    h, s, f, V = 64, 32, 192, 128
    linear = 2 * h * 3 * h + 2 * h * h
    mlp = 2 * 3 * h * f
    dense_layer = linear + 2 * h * s + mlp  # causal scores: 2 x (h x s/2 x 2)
    k = 4  # round(0.125 x 32)
    mod_layer = (k / s) * (linear + 2 * h * k + mlp) + 2 * h
    expected = dense_layer + mod_layer + 2 * h * V
    assert math.isclose(forward_flops_per_token(m, f, V, [1], [0.125], []), expected, rel_tol=1e-15)
    assert math.isclose(train_flops_per_token(m, f, V, [1], [0.125], []), 3 * expected, rel_tol=1e-15)
    # capacity 1.0 costs the dense layer plus the router
    assert forward_flops_per_token(m, f, V, [1], [1.0], []) == 2 * dense_layer + 2 * h + 2 * h * V
    # the predictor (h -> h/8 -> 1) is counted too
    m.mod.causal = "predictor"
    assert forward_flops_per_token(m, f, V, [1], [1.0], []) == 2 * dense_layer + 2 * h + 2 * (h * 8 + 8) + 2 * h * V


def test_mod_and_moe_presets_against_their_dense_twin():
    """gpt_350m_mod = gpt_350m minus 7/8 of every other layer (plus routers); the MoE twin with as
    many active MLP parameters per token costs exactly the dense model (routers uncounted)."""
    dense_model, _, dense = ours("gpt_350m")
    _, _, moe = ours("gpt_350m_moe")
    assert moe == dense
    _, d, mod = ours("gpt_350m_mod")
    h, s, layers = 1024, 2048, 12
    k = 256
    attn_linear, mlp = 2 * 4 * h * h, 2 * 3 * h * 2752
    saved = layers * 3 * ((1 - k / s) * (attn_linear + mlp) + 2 * h * (s - k * k / s) - 2 * h)
    assert math.isclose(dense - mod, saved, rel_tol=1e-12)


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
