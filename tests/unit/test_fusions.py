"""Fused kernels and fp8 decided once from what is installed (model/fusions.py), and expert tensor
parallelism's config rules and checkpoint layout (single process)."""

import pytest

from mod_train.checkpoint.layout import CheckpointDir
from mod_train.checkpoint.state import Checkpointer, layout_of
from mod_train.config.load import compose, to_config
from mod_train.config.validate import ConfigError, validate
from mod_train.model.fusions import Availability, as_params, decide, describe, fp8_refusal

CPU = Availability(cuda=False)
# An H100 with Transformer Engine 2.4, Triton and apex's fast LayerNorm.
GPU_TE = Availability(cuda=True, te_version=(2, 4), fp8_device=True, fp8_device_reason="supported", triton=True,
                      apex_persist_layer_norm=True)
# The GPU check machine: CUDA and Triton (torch's wheel), no Transformer Engine, no apex.
GPU_BARE = Availability(cuda=True, triton=True)
SWIGLU_ROPE = dict(activation="swiglu", position_embedding="rope", normalization="RMSNorm")


def _cfg(*overrides):
    return to_config(compose(["model.vocab_size=500", *overrides]))


def check(*overrides, world_size=1):
    return validate(_cfg(*overrides), world_size=world_size, check_files=False, has_cuda=False)


def test_cpu_turns_every_fusion_off_with_its_reason():
    plan = decide(CPU, **SWIGLU_ROPE)
    assert not any(d.on for d in plan.decisions().values())
    assert plan.bias_activation_fusion.reason == plan.bias_dropout_fusion.reason == "no CUDA device"
    assert "main_grad" in plan.gradient_accumulation_fusion.reason
    assert plan.transformer_config_kwargs() == {
        "bias_activation_fusion": False, "bias_dropout_fusion": False, "apply_rope_fusion": False,
        "persist_layer_norm": False, "masked_softmax_fusion": False, "gradient_accumulation_fusion": False}


def test_gpu_with_transformer_engine_turns_the_fused_paths_on():
    plan = decide(GPU_TE, **SWIGLU_ROPE, fp8=True, fp8_recipe="current")
    on = {k for k, d in plan.decisions().items() if d.on}
    # persist_layer_norm: TE's layer spec has its own norms; gradient accumulation: DeepSpeed's grads.
    assert on == {"bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "fp8"}
    kwargs = plan.transformer_config_kwargs()
    assert kwargs["fp8"] == "hybrid" and kwargs["fp8_recipe"] == "tensorwise"  # megatron's name for current
    assert as_params(plan)["fusions.fp8_recipe"] == "tensorwise" and as_params(plan)["fusions.fp8"] == "on"
    # MoD layers rotate routed tokens with per-sample frequencies, which TE's fused RoPE does not take.
    assert not decide(GPU_TE, **SWIGLU_ROPE, mod=True).apply_rope_fusion.on
    # gelu (no GLU) has no bias here, which megatron's fused GeLU needs; TE < 1.4 has no fused RoPE.
    old_te = Availability(cuda=True, te_version=(1, 3), triton=True)
    plan = decide(old_te, activation="gelu", position_embedding="rope", normalization="LayerNorm")
    assert not plan.bias_activation_fusion.on and plan.bias_dropout_fusion.on
    assert not plan.apply_rope_fusion.on and "TE >= 1.4" in plan.apply_rope_fusion.reason


def test_gpu_without_te_uses_compiled_fusions_and_apex_layer_norm_only_where_present():
    plan = decide(GPU_BARE, **SWIGLU_ROPE)
    assert plan.bias_activation_fusion.on and plan.bias_dropout_fusion.on
    assert not plan.apply_rope_fusion.on and "no Transformer Engine" in plan.apply_rope_fusion.reason
    apex = Availability(cuda=True, triton=True, apex_persist_layer_norm=True)
    assert decide(apex, activation="swiglu", position_embedding="rope", normalization="LayerNorm").persist_layer_norm.on
    assert not decide(GPU_BARE, activation="swiglu", position_embedding="rope",
                      normalization="LayerNorm").persist_layer_norm.on
    assert not decide(Availability(cuda=True), **SWIGLU_ROPE).bias_dropout_fusion.on  # no Triton


def test_fp8_refusals_say_why_and_what_to_do():
    assert fp8_refusal(GPU_TE) is None and fp8_refusal(GPU_TE, "current", has_moe=True) is None
    assert "transformer_engine is not importable" in fp8_refusal(CPU)
    assert "needs a CUDA GPU" in fp8_refusal(Availability(cuda=False, te_version=(2, 4)))
    ada_less = Availability(cuda=True, te_version=(2, 4), fp8_device=False, fp8_device_reason="Device compute "
                            "capability 8.9 or higher required for FP8 execution.")
    assert "capability 8.9" in fp8_refusal(ada_less) and "train.precision=bf16" in fp8_refusal(ada_less)
    old = Availability(cuda=True, te_version=(2, 1), fp8_device=True)
    assert "train.fp8_recipe=delayed" in fp8_refusal(old, "current") and fp8_refusal(old, "delayed") is None


def test_fp8_is_refused_here_before_any_process_group():
    with pytest.raises(ConfigError, match=r"train.precision=fp8 .*transformer_engine is not importable.*"
                                          r"Use train.precision=bf16"):
        check("train.precision=fp8")
    # mod-submit validates for GPU nodes on a login node: fp8 is checked again when the run starts.
    d = validate(_cfg("train.precision=fp8"), world_size=1, check_files=False, has_cuda=True)
    assert d.bf16 and d.fusions.fp8.on


@pytest.mark.parametrize("overrides,needle", [
    (["model.hidden_size=72", "model.num_attention_heads=4"], "widths divisible by 16, and model.hidden_size = 72"),
    (["model.seq_length=36", "parallel.micro_batch_size=1"], "token counts divisible by 8, and model.seq_length x"),
    (["model=tiny_mod", "model.mod.capacity=0.1", "parallel.micro_batch_size=1"], "a MoD layer's routed tokens"),
])
def test_fp8_shapes_transformer_engine_cannot_run_are_refused_on_any_machine(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(_cfg("train.precision=fp8", *overrides), world_size=1, check_files=False, has_cuda=True)


def test_cpu_transformer_config_has_the_fusions_off_and_the_start_line_lists_them():
    from mod_train.model.build import transformer_config

    cfg = _cfg()
    d = validate(cfg, world_size=1, check_files=False)  # this machine as it is (no CUDA, no TE)
    tc = transformer_config(cfg, d)
    assert not any((tc.bias_activation_fusion, tc.bias_dropout_fusion, tc.apply_rope_fusion, tc.persist_layer_norm,
                    tc.masked_softmax_fusion, tc.gradient_accumulation_fusion)) and tc.fp8 is None
    line = describe(d.fusions)
    assert line.startswith("fusions: bias_activation=off (no CUDA device), bias_dropout=off")
    for name in ("apply_rope", "persist_layer_norm", "masked_softmax", "gradient_accumulation", "fp8"):
        assert f"{name}=off (" in line


# ----------------------------------------------------------------------------- expert tensor parallelism
MOE = ["model.moe.num_experts=4"]


@pytest.mark.parametrize("overrides,world,needle", [
    ([*MOE, "parallel.etp=2"], 2, "parallel.etp=2 differs from parallel.tp=1 but parallel.ep=1"),
    ([*MOE, "parallel.etp=2", "parallel.ep=4"], 4, "parallel.etp x parallel.ep = 2 x 4 = 8 must divide"),
    ([*MOE, "parallel.etp=2", "parallel.ep=2", "parallel.zero_stage=3"], 4, "needs parallel.zero_stage=1 or 2"),
    ([*MOE, "parallel.etp=3", "parallel.ep=2", "model.moe.ffn_hidden_size=64"], 6,
     "expert FFN hidden size 64 is not divisible by the expert tensor parallel size 3"),
    (["parallel.etp=2"], 2, "the model has no experts"),
    (["parallel.etp=0"], 1, "parallel.etp=0 is out of range"),
])
def test_bad_expert_tensor_parallel_layouts_are_rejected(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        check(*overrides, world_size=world)
    assert needle in str(e.value)


def test_etp_layouts_megatron_allows_pass_and_are_recorded(tmp_path):
    # TP2 x ETP1 x EP2 on 2 ranks: data-parallel size 1, which the EP rule for etp = tp would refuse.
    tp2 = ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.etp=1", "parallel.ep=2"]
    assert check(*MOE, *tp2, world_size=2).dp == 1
    assert check(*MOE, "parallel=tp2_etp1_ep2", world_size=2).dp == 1  # the preset
    cfg = _cfg(*MOE, *tp2)
    layout = layout_of(cfg, check(*MOE, *tp2, world_size=2))
    assert (layout["tp"], layout["etp"], layout["ep"]) == (2, 1, 2)
    assert layout_of(_cfg(), check())["etp"] == 1  # null: the dense TP size

    # A checkpoint from before etp was recorded split its experts over the dense TP size.
    root = tmp_path / "ck"
    staging = CheckpointDir(root).begin(1)
    (staging / "state").mkdir()
    old = {"tp": 2, "pp": 1, "vpp": None, "ep": 2, "cp": 1, "dp": 1, "zero_stage": 1}
    it = CheckpointDir(root).commit(1, {"layout": old})
    assert not Checkpointer(root, 1, 0, layout={**old, "etp": 2}).needs_reshard(it)
    assert Checkpointer(root, 1, 0, layout={**old, "etp": 1}).needs_reshard(it)
