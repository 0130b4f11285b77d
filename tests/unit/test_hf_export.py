"""mod-export --format hf: the exported directory loads with transformers offline; its logits equal
ours (dense/MoE: megatron's forward; MoD/MoDE: our causal forward) and greedy generate() equals
mod-generate's tokens; Llama export -> import -> export gives identical tensors."""

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from mod_train.config.validate import validate  # noqa: E402
from mod_train.hf.export import HFTarget, export_loaded_hf  # noqa: E402
from mod_train.inference.decoder import full_forward_logits  # noqa: E402
from mod_train.inference.generation import generate  # noqa: E402
from tests.unit.test_inference import V, build, sharpen_routers  # noqa: E402

RTOL = 1e-5


def loaded_of(model, cfg):
    derived = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    return SimpleNamespace(model=model, config=cfg, derived=derived)


def set_thresholds(model, ids):
    """Thresholds at the median causal logit of ``ids`` (about half the tokens routed), as calibration would."""
    from tests.unit.test_inference import capture_input, mod_layers

    for _, layer in mod_layers(model):
        seen = {}
        h = capture_input(layer, seen, "x")
        full_forward_logits(model, ids)
        h.remove()
        logits = layer.router.causal_logits(seen["x"], layer.router.scores(seen["x"]))[0]
        layer.router.causal_threshold.fill_(float(logits.median()) + 1e-4)


def close(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


CASES = [
    ("model=tiny model.num_query_groups=2 model.tie_embeddings=true", HFTarget.llama),
    ("model=tiny_moe model.moe.every=1 model.moe.offset=0", HFTarget.mixtral),
    ("model=tiny_moe model.moe.top_k=1 model.moe.shared_expert_ffn_hidden_size=32", HFTarget.mod_train),
    ("model=tiny_mod", HFTarget.mod_train),
    ("model=tiny model.normalization=LayerNorm model.activation=gelu model.position_embedding=learned_absolute",
     HFTarget.mod_train),
    ("model=tiny_mod model.mod.causal=predictor model.num_query_groups=2", HFTarget.mod_train),
    ("model=tiny_mode_staged", HFTarget.mod_train),
    ("model=tiny_mode_integrated", HFTarget.mod_train),
]


@pytest.mark.parametrize("overrides,target", CASES)
def test_hf_export_logits_and_greedy(megatron_tp1, tmp_path, overrides, target):
    from transformers import AutoModelForCausalLM

    model, cfg = build(*overrides.split())
    ids = [int(t) for t in torch.randint(4, V, (24,), generator=torch.Generator().manual_seed(1))]
    if cfg.model.mod.enabled:
        sharpen_routers(model, ids)
        set_thresholds(model, ids)
    out, got_target = export_loaded_hf(loaded_of(model, cfg), tmp_path / "hf")
    assert got_target is target
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    ours = full_forward_logits(model, ids)
    assert theirs.shape == ours.shape
    assert close(theirs, ours) < RTOL, close(theirs, ours)

    prompt, n = ids[:7], 10
    want = generate(model, cfg, prompt, n, greedy=True).tokens[0]
    with torch.no_grad():
        got = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want


def test_llama_export_import_export_round_trip_and_mismatch(megatron_tp1, tmp_path):
    """export -> hf: import into a fresh model -> export: identical tensors (GQA, untied); a preset
    that does not match the directory is refused at preflight naming the keys."""
    from safetensors.torch import load_file

    from mod_train.checkpoint.compatibility import IncompatibleCheckpoint, check_resume_and_init
    from mod_train.config.load import to_plain_dict
    from mod_train.hf.import_ import load_hf_into

    overrides = ["model=tiny", "model.num_query_groups=2"]
    model, cfg = build(*overrides, seed=0)
    first, target = export_loaded_hf(loaded_of(model, cfg), tmp_path / "a")
    assert target is HFTarget.llama
    check_resume_and_init(to_plain_dict(cfg), tmp_path / "ck", "none", f"hf:{first}")  # matches: no error

    fresh, _ = build(*overrides, seed=5)
    assert not torch.equal(fresh.decoder.layers[0].self_attention.linear_qkv.weight,
                           model.decoder.layers[0].self_attention.linear_qkv.weight)
    load_hf_into([fresh], f"hf:{first}")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if torch.is_tensor(a) and not name.endswith("_extra_state"):
            assert torch.equal(a, b), name
    second, _ = export_loaded_hf(loaded_of(fresh, cfg), tmp_path / "b")
    one, two = load_file(str(next(first.glob("*.safetensors")))), load_file(str(next(second.glob("*.safetensors"))))
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)

    _, other = build("model=tiny", "model.num_layers=2")
    with pytest.raises(IncompatibleCheckpoint, match=r"model.num_layers: ours 2, a 4.*num_query_groups: ours 4, a 2"):
        check_resume_and_init(to_plain_dict(other), tmp_path / "ck", "none", f"hf:{first}")


def test_upcycling_a_mod_twin_from_a_dense_export(megatron_tp1, tmp_path):
    """hf:<dense export> into the MoD twin: every dense weight loaded, routers as initialised."""
    from mod_train.checkpoint.compatibility import check_resume_and_init
    from mod_train.config.load import to_plain_dict
    from mod_train.hf.import_ import load_hf_into

    dense, cfg = build("model=tiny", seed=0)
    hf_dir, _ = export_loaded_hf(loaded_of(dense, cfg), tmp_path / "dense")
    twin, twin_cfg = build("model=tiny_mod", seed=3)
    check_resume_and_init(to_plain_dict(twin_cfg), tmp_path / "ck", "none", f"hf:{hf_dir}")
    routers = {k: v.clone() for k, v in twin.state_dict().items() if ".router." in k}
    load_hf_into([twin], f"hf:{hf_dir}")
    got = twin.state_dict()
    for name, value in dense.state_dict().items():
        if torch.is_tensor(value) and not name.endswith("_extra_state"):
            assert torch.equal(got[name], value), name
    assert routers and all(torch.equal(got[k], v) for k, v in routers.items())


def test_import_cli_writes_a_layout_free_model_dir(megatron_tp1, tmp_path):
    """python -m mod_train.hf.import_: an HF Llama dir -> a model dir that init_from loads under any layout."""
    from mod_train.checkpoint.read import load_weights_from
    from mod_train.hf.import_ import main as import_main

    model, cfg = build("model=tiny", seed=0)
    hf_dir, _ = export_loaded_hf(loaded_of(model, cfg), tmp_path / "hf")
    assert import_main([str(hf_dir), str(tmp_path / "model"), "model=tiny", f"model.vocab_size={V}"]) == 0
    fresh, _ = build("model=tiny", seed=7)
    load_weights_from([fresh], tmp_path / "model")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if torch.is_tensor(a) and not name.endswith("_extra_state"):
            assert torch.equal(a, b), name
