"""``checkpoint.init_from=hf:<dir>``: start a run from a local Hugging Face Llama-architecture checkpoint.

The directory's ``config.json`` must describe the chosen ``model=`` preset (checked at preflight,
with the differing keys named); its safetensors weights are converted to megatron-core's names and
grouped QKV layout (``weights.llama_to_megatron``) and loaded into the model before the engine
exists. A MoD twin of the dense preset (upcycling) takes every dense weight; its routers keep their
initialisation (with ``model.mod.capacity_schedule`` the first steps route every token). The
tokenizer of an exported directory is its ``tokenizer.json``: point
``data.tokenizer_model`` at the directory. An embedding with fewer rows than our padded
vocabulary is padded with zeros (those ids are never produced by the tokenizer).

Layouts: TP=1 and PP=1 (any data parallelism / ZeRO stage). For other layouts, convert once into
a layout-free model directory in one process and ``init_from`` that::

    python -m mod_train.hf.import_ <hf_dir> <model_dir> model=tiny ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from mod_train.hf import weights
from mod_train.hf.deps import require

HF_PREFIX = "hf:"


class HFImportError(ValueError):
    pass


def is_hf_source(init_from) -> bool:
    return isinstance(init_from, str) and init_from.startswith(HF_PREFIX)


def hf_dir_of(init_from: str) -> Path:
    path = Path(init_from[len(HF_PREFIX):]).expanduser()
    if not (path / "config.json").exists():
        raise HFImportError(f"checkpoint.init_from={init_from}: {path} holds no config.json; give a local "
                            "Hugging Face model directory (hf:<dir>)")
    return path


def _rope_theta(hf: Dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def mismatches(hf: Dict[str, Any], model: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(model key, ours, theirs) for every shape-relevant setting where the HF config differs."""
    heads = model["num_attention_heads"]
    out = []
    if hf.get("model_type") != "llama":
        out.append(("architecture", "llama (RMSNorm/SwiGLU/RoPE)", hf.get("model_type")))
    pairs = [("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
             ("num_attention_heads", "num_attention_heads")]
    for ours, theirs in pairs:
        if model.get(ours) != hf.get(theirs):
            out.append((f"model.{ours}", model.get(ours), hf.get(theirs)))
    groups = model.get("num_query_groups") or heads
    if groups != (hf.get("num_key_value_heads") or hf.get("num_attention_heads")):
        out.append(("model.num_query_groups", groups, hf.get("num_key_value_heads")))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim != model["hidden_size"] // heads:
        out.append(("head_dim (hidden/heads)", model["hidden_size"] // heads, head_dim))
    if model.get("ffn_hidden_size") is not None and model["ffn_hidden_size"] != hf.get("intermediate_size"):
        out.append(("model.ffn_hidden_size", model["ffn_hidden_size"], hf.get("intermediate_size")))
    if bool(model.get("tie_embeddings")) != bool(hf.get("tie_word_embeddings")):
        out.append(("model.tie_embeddings", model.get("tie_embeddings"), hf.get("tie_word_embeddings")))
    if float(model.get("rotary_base", 10000)) != _rope_theta(hf):
        out.append(("model.rotary_base", model.get("rotary_base"), _rope_theta(hf)))
    arch = (model.get("normalization"), model.get("activation"), model.get("position_embedding"))
    if arch != ("RMSNorm", "swiglu", "rope"):
        out.append(("model.normalization/activation/position_embedding", "/".join(map(str, arch)),
                    "RMSNorm/swiglu/rope"))
    if (model.get("moe") or {}).get("num_experts"):
        out.append(("model.moe", "MoE", "dense Llama"))
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        out.append(("Llama variant", "silu, no biases", f"{hf.get('hidden_act')}, biases"))
    return out


def check_hf_init(init_from: str, cfg_dict: Dict[str, Any]) -> None:
    """Preflight: the HF directory exists and its config.json matches ``model=`` (HFImportError naming keys)."""
    path = hf_dir_of(init_from)
    hf = json.loads((path / "config.json").read_text())
    bad = mismatches(hf, cfg_dict["model"])
    if bad:
        rows = "; ".join(f"{key}: ours {ours!r}, {path.name} {theirs!r}" for key, ours, theirs in bad)
        raise HFImportError(f"checkpoint.init_from={init_from} does not match the chosen model: {rows}. Pick the "
                            "preset / model.* overrides that describe this checkpoint")


def read_hf_state(path: Path) -> Dict[str, torch.Tensor]:
    require("safetensors")
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFImportError(f"{path} holds no *.safetensors weights")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def megatron_state_from_hf(path: Path, tc, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """The TP1 megatron state dict of an HF Llama directory for a model of megatron TransformerConfig
    ``tc`` (vocabulary padded to ``padded_vocab`` rows)."""
    heads = tc.num_attention_heads
    groups = tc.num_query_groups or heads
    state = read_hf_state(path)
    hf = json.loads((path / "config.json").read_text())
    tied = bool(hf.get("tie_word_embeddings"))
    try:
        out = weights.llama_to_megatron(state, tc.num_layers, heads, groups, tc.kv_channels, tied)
    except KeyError as e:
        raise HFImportError(f"{path}: weight {e} missing (not a Llama checkpoint?)") from None
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in out and out[key].size(0) != padded_vocab:
            rows = out[key].size(0)
            if rows > padded_vocab:
                raise HFImportError(f"{path}: {rows} vocabulary rows, more than this run's {padded_vocab} "
                                    "(set model.vocab_size / data.tokenizer_model to the checkpoint's tokenizer)")
            out[key] = torch.cat([out[key], out[key].new_zeros(padded_vocab - rows, out[key].size(1))])
    return out


def load_hf_into(chunks: Sequence[torch.nn.Module], init_from: str) -> Path:
    """Load ``hf:<dir>`` into this rank's model chunks (TP=PP=1; HFImportError otherwise)."""
    from mod_train.model.unwrap import unwrap_model

    path = hf_dir_of(init_from)
    if len(chunks) != 1:
        raise HFImportError(f"checkpoint.init_from={init_from} needs pipeline-parallel size 1; convert once with "
                            "`python -m mod_train.hf.import_` and init_from the model directory it writes")
    model = unwrap_model(chunks[0])
    if model.config.tensor_model_parallel_size != 1:
        raise HFImportError(f"checkpoint.init_from={init_from} needs tensor-parallel size 1; convert once with "
                            "`python -m mod_train.hf.import_` and init_from the model directory it writes")
    padded = model.embedding.word_embeddings.weight.size(0)
    state = megatron_state_from_hf(path, model.config, padded)
    own = {k for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    # Upcycling: a MoD twin of the dense model keeps its routers as built (capacity_schedule starts
    # at 1.0, so the first steps route every token), every dense weight comes from the directory.
    routers = {k for k in own if ".router." in k and k not in state and ".mlp." not in k}
    own -= routers
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise HFImportError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        params = dict(model.state_dict())
        for key in own:
            if params[key].shape != state[key].shape:
                raise HFImportError(f"{path}: {key} has shape {tuple(state[key].shape)}, this model "
                                    f"{tuple(params[key].shape)}")
            params[key].copy_(state[key].to(params[key].dtype))
    return path


def main(argv=None) -> int:
    """Convert an HF Llama directory into a layout-free model directory (``init_from`` under any layout)."""
    import argparse

    from mod_train.checkpoint.model_io import save_model
    from mod_train.config.load import compose, to_config
    from mod_train.distributed.world_of_one import single_process_layout, world_of_one
    from mod_train.config.validate import validate
    from mod_train.model.build import build_model_chunks

    p = argparse.ArgumentParser(prog="python -m mod_train.hf.import_", description=main.__doc__)
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("overrides", nargs="*",
                   help="Hydra overrides naming the model (model=tiny, data.tokenizer_model=...)")
    a = p.parse_args(argv)
    cfg = single_process_layout(to_config(compose(list(a.overrides))))
    init_from = HF_PREFIX + a.hf_dir
    from mod_train.config.load import to_plain_dict

    check_hf_init(init_from, to_plain_dict(cfg))
    if cfg.model.vocab_size is None:  # the run's tokenizer, else the directory's tokenizer.json
        from mod_train.config.validate import tokenizer_vocab_size

        cfg.model.vocab_size = tokenizer_vocab_size(cfg.data.tokenizer_model or a.hf_dir)
    with world_of_one():
        derived = validate(cfg, world_size=1, check_files=False, has_cuda=torch.cuda.is_available())
        chunks = build_model_chunks(cfg, derived)
        load_hf_into(chunks, init_from)
        save_model(chunks, a.out)
    print(f"wrote {a.out} (checkpoint.init_from={a.out})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
