"""Bad configs fail at start, before any process group, with a message naming what to change."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mod_train.config import ConfigError, validate
from mod_train.config.load import compose, to_config

REPO = Path(__file__).resolve().parents[2]


def cfg_with(*overrides):
    return to_config(compose(list(overrides)))


def check(*overrides, world_size=1):
    return validate(cfg_with("model.vocab_size=500", *overrides), world_size=world_size, check_files=False,
                    has_cuda=False)


def test_defaults_validate_and_derive_layout():
    d = check("parallel.micro_batch_size=2", "parallel.global_batch_size=16", world_size=4)
    assert (d.dp, d.num_microbatches, d.global_batch_size) == (4, 2, 16)
    assert d.mod_layers == [] and not d.bf16


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp x parallel.pp"),
    (["parallel.tp=3"], 3, "num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=3"], 3, "num_layers=4 is not divisible by parallel.pp"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_length=63"], 2, "seq_length=63 is not divisible"),
    (["parallel.global_batch_size=10", "parallel.micro_batch_size=4"], 1, "global_batch_size=10 is not divisible"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "zero_stage=2 with parallel.pp=2"),
    (["parallel.ep=2"], 2, "no experts"),
    (["model.moe.num_experts=3", "parallel.ep=2"], 2, "num_experts=3 is not divisible by parallel.ep=2"),
    (["model.moe.num_experts=2", "model.moe.top_k=3"], 1, "top_k=3 must be between 1"),
    (["model=tiny_mod", "model.mod.capacity=0"], 1, "it must be in (0, 1]"),
    (["model=tiny_mod", "model.mod.capacity=1.5"], 1, "it must be in (0, 1]"),
    (["model=tiny_mod", "model.mod.layers=[7]"], 1, "out of range for model.num_layers=4"),
    (["model=tiny_mod", "model.mod.capacity=0.001"], 1, "rounds to k=0"),
    (["parallel.cp=2"], 2, "context parallelism is not supported"),
    (["checkpoint.async_save=true", "checkpoint.deepspeed_files=true"], 1, "set checkpoint.deepspeed_files=false"),
    (["train.inject.checkpoint_write_delay_s=2"], 1, "it needs checkpoint.async_save=true"),
    (["model=tiny_mod", "model.mod.capacity=0.05", "parallel.tp=2", "parallel.sequence_parallel=true"], 2,
     "routes k=3 tokens, which sequence parallel cannot split over parallel.tp=2"),
])
def test_impossible_configs_are_rejected(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        check(*overrides, world_size=world)
    assert needle in str(e.value)


def test_missing_files_and_vocab_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer file"):
        validate(cfg_with(f"data.tokenizer_model={tmp_path}/nope.model"), world_size=1, has_cuda=False)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a readable sentencepiece model"):
        validate(cfg_with(f"data.tokenizer_model={bad}"), world_size=1, has_cuda=False)


def test_unknown_key_and_wrong_type_fail_at_compose():
    with pytest.raises(Exception, match="hiden_size"):
        compose(["model.hiden_size=3"])
    with pytest.raises(Exception, match="hidden_size"):
        to_config(compose(["model.hidden_size=abc"]))


@pytest.mark.parametrize("override,allowed", [
    ("model.mod.router_weight=softmax", "[sigmoid, logit, none]"),
    ("model.mod.causal=oracle", "[aux_loss, predictor]"),
    ("model.moe.token_dispatcher=flex", "[alltoall, allgather]"),
    ("model.moe.mode=mixed", "[none, staged, integrated]"),
    ("model.normalization=rmsnorm", "[RMSNorm, LayerNorm]"),
    ("model.activation=relu", "[swiglu, gelu]"),
    ("model.position_embedding=alibi", "[rope, learned_absolute]"),
    ("optim.schedule=linear", "[cosine, constant, wsd]"),
    ("train.precision=fp16", "[auto, fp32, bf16, fp8]"),
    ("slurm.container.runtime=docker", "[none, pyxis, apptainer]"),
    ("slurm.rendezvous=etcd", "[c10d, static]"),
])
def test_a_value_outside_a_choice_fails_at_compose_with_the_key_and_the_choices(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        compose([override])
    msg = str(e.value)
    assert f"Invalid value '{value}', expected one of {allowed}" in msg and f"full_key: {key}" in msg


def test_choices_parse_from_yaml_and_overrides_and_read_as_plain_strings():
    from mod_train.config.load import to_plain_dict
    from mod_train.config.schema import Choice, MoDEMode, Normalization, RouterWeight

    cfg = cfg_with("model=tiny_mode_staged", "model.mod.router_weight=logit", "model.normalization=LayerNorm")
    assert cfg.model.moe.mode is MoDEMode.staged and cfg.model.moe.mode == "staged"  # from conf/model/*.yaml
    assert cfg.model.mod.router_weight is RouterWeight.logit and cfg.model.normalization is Normalization.LayerNorm
    assert f"{cfg.model.mod.router_weight}" == str(cfg.model.mod.router_weight) == "logit"
    assert {"logit": 1}[cfg.model.mod.router_weight] == 1
    plain = to_plain_dict(cfg)  # checkpoint metadata, MLflow params: plain strings
    assert type(plain["model"]["mod"]["router_weight"]) is str and plain["model"]["moe"]["mode"] == "staged"
    assert to_config(compose([f"model.moe.mode={plain['model']['moe']['mode']}"])).model.moe.mode is MoDEMode.staged
    # OmegaConf matches members by NAME: every Choice member must be named as its value.
    for choice in Choice.__subclasses__():
        assert all(m.name == m.value for m in choice), choice


def test_cli_rejects_bad_config_before_starting_processes(tmp_path):
    """`mod-launch` validates before torchrun; the message names the key and exit code is 2."""
    r = subprocess.run([sys.executable, "-m", "launch.local", "--nproc", "3", "parallel.tp=2",
                        f"data.tokenizer_model={tmp_path}/x.model"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "world size 3 is not divisible by parallel.tp" in r.stderr


def test_missing_data_path_and_vocab_mismatch_with_real_tokenizer(tiny_data, tmp_path):
    tok = f"data.tokenizer_model={tiny_data['tokenizer']}"
    with pytest.raises(ConfigError, match=r"data.paths: '.*/nothing' has no .bin or .idx file"):
        validate(cfg_with(tok, f"data.paths=[{tmp_path}/nothing]"), world_size=1, has_cuda=False)
    with pytest.raises(ConfigError, match="data.paths is empty"):
        validate(cfg_with(tok, "data.paths=[]"), world_size=1, has_cuda=False)
    data = f"data.paths=[{tiny_data['prefix']}]"
    with pytest.raises(ConfigError, match=r"model.vocab_size=1000 does not match the tokenizer's vocabulary of 512"):
        validate(cfg_with(tok, data, "model.vocab_size=1000"), world_size=1, has_cuda=False)
    d = validate(cfg_with(tok, data), world_size=1, has_cuda=False)
    assert (d.vocab_size, d.padded_vocab_size) == (512, 512)


def test_train_cli_exits_with_config_error_before_process_group(tiny_data, tmp_path):
    """`mod-train` itself (no launcher) refuses a missing data path with exit code 2."""
    r = subprocess.run([sys.executable, "-m", "mod_train.train", f"data.tokenizer_model={tiny_data['tokenizer']}",
                        f"data.paths=[{tmp_path}/missing]", f"train.run_dir={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "missing' has no .bin or .idx file" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mock_data_needs_a_vocab_size_and_no_files():
    d = validate(cfg_with("data=mock", "model.vocab_size=1000"), world_size=1, has_cuda=False)
    assert (d.vocab_size, d.padded_vocab_size) == (1000, 1024)  # no tokenizer or data file was read
    with pytest.raises(ConfigError, match="data.mock=true generates tokens without a tokenizer: set model.vocab_size"):
        validate(cfg_with("data=mock"), world_size=1, has_cuda=False)
    with pytest.raises(ConfigError, match="data.mock=true reads no files: use data=mock"):
        validate(cfg_with("data.mock=true", "model.vocab_size=1000"), world_size=1, has_cuda=False)
    with pytest.raises(ConfigError, match="data.tokenizer_model is null"):
        validate(cfg_with("data.tokenizer_model=null"), world_size=1, has_cuda=False)


@pytest.mark.parametrize("preset,params", [("gpt_125m", 134e6), ("gpt_350m", 369e6), ("gpt_1b", 0.94e9)])
def test_gpu_presets_have_the_sizes_their_names_say(preset, params, megatron_tp1):
    from mod_train.model.build import build_model_chunks, count_parameters

    cfg = cfg_with(f"model={preset}", "data=mock", "model.vocab_size=32000")
    d = validate(cfg, world_size=1, has_cuda=False)
    assert cfg.model.seq_length == 2048
    with torch.device("meta"):  # shapes only: no memory, no init time
        chunks = build_model_chunks(cfg, d)
    assert count_parameters(chunks) == pytest.approx(params, rel=0.01)
