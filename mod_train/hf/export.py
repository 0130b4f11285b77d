"""One training checkpoint (any layout) -> a Hugging Face ``transformers`` directory (``mod-export --format hf``).

Which class the directory names:

* dense, RMSNorm + SwiGLU + RoPE (our default architecture, MHA or GQA, tied or not): the stock
  ``LlamaForCausalLM``;
* MoE on every layer with megatron's default top-k routing (top_k >= 2: softmax over the top-k
  logits, which equals Mixtral's softmax over all, top-k, renormalise), no shared expert, no
  no-op columns: the stock ``MixtralForCausalLM``;
* everything else (MoD, staged/integrated MoDE, top-1 MoE whose weight is the unnormalised
  pre-softmax probability, shared experts, MoE on some layers only, LayerNorm / GELU / learned
  positions): our own ``ModTrainForCausalLM`` (``remote/``), copied into the directory and
  registered through ``auto_map`` (``trust_remote_code=True``), with causal MoD routing on the
  calibrated thresholds and a KV cache.

MoE with a capacity factor is refused: megatron drops tokens depending on the whole batch, which
no per-token model reproduces. The tokenizer goes along: a sentencepiece model converted to
``tokenizer.json`` (``data_prep.sp_to_hf``, same ids), a ``tokenizer.json`` copied. Padded
vocabulary rows are in ``generation_config.suppress_tokens`` (``mod-generate`` never samples them).
"""

from __future__ import annotations

import json
import shutil
from enum import Enum
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from mod_train.hf.deps import require
from mod_train.hf import weights

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_mod_train.py", "modeling_mod_train.py")
AUTO_MAP = {"AutoConfig": "configuration_mod_train.ModTrainConfig",
            "AutoModelForCausalLM": "modeling_mod_train.ModTrainForCausalLM"}


class HFExportError(Exception):
    pass


class HFTarget(str, Enum):
    llama = "llama"
    mixtral = "mixtral"
    mod_train = "mod_train"  # our own classes, shipped in the directory


def choose_target(cfg, derived) -> Tuple[HFTarget, str]:
    """The class an exported model gets, and why (HFExportError for a model no class reproduces)."""
    m = cfg.model
    if m.moe.num_experts > 0 and m.moe.capacity_factor is not None:
        raise HFExportError(f"model.moe.capacity_factor={m.moe.capacity_factor}: megatron drops tokens depending "
                            "on the whole batch, which no per-token Hugging Face model reproduces; export a "
                            "dropless (capacity_factor=null) model")
    if m.moe.num_experts > 0 and m.moe.load_balancing == "expert_bias":
        raise HFExportError("model.moe.load_balancing=expert_bias: the router picks experts by sigmoid score plus "
                            "a trained per-expert bias, which neither Mixtral nor the exported mod_train classes "
                            "(softmax top-k) reproduce; export a model trained with load_balancing aux_loss, "
                            "seq_aux_loss or none")
    if m.mod.enabled:
        return HFTarget.mod_train, "Mixture-of-Depths layers (causal routing) have no stock class"
    stock = m.normalization == "RMSNorm" and m.activation == "swiglu" and m.position_embedding == "rope"
    if not stock:
        return HFTarget.mod_train, (f"{m.normalization}/{m.activation}/{m.position_embedding} is not the "
                                    "Llama/Mixtral architecture (RMSNorm/swiglu/rope)")
    if m.moe.num_experts == 0:
        return HFTarget.llama, "dense RMSNorm/SwiGLU/RoPE"
    every_layer = sorted(derived.moe_layers) == list(range(m.num_layers))
    if every_layer and m.moe.top_k >= 2 and m.moe.mode == "none" and not m.moe.shared_expert_ffn_hidden_size:
        return HFTarget.mixtral, "MoE on every layer, softmax over the top-k logits (= Mixtral's renormalised top-k)"
    return HFTarget.mod_train, ("MoE routing Mixtral does not match (top-1 pre-softmax weights, shared experts, "
                                "no-op experts or MoE on some layers only)")


def _heads(cfg) -> Tuple[int, int, int]:
    m = cfg.model
    return m.num_attention_heads, m.num_query_groups or m.num_attention_heads, m.hidden_size // m.num_attention_heads


def _common(cfg, derived, special: Dict[str, Optional[int]]) -> dict:
    m = cfg.model
    heads, groups, d = _heads(cfg)
    return dict(vocab_size=derived.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=heads, num_key_value_heads=groups, head_dim=d,
                max_position_embeddings=m.seq_length, tie_word_embeddings=m.tie_embeddings, **special)


def layer_specs(cfg, derived) -> list:
    """Our own class's per-layer description (configuration_mod_train's ``layers``)."""
    from mod_train.model.flops import noop_columns

    m = cfg.model
    capacity = dict(zip(derived.mod_layers, derived.mod_capacities))
    specs = []
    for i in range(m.num_layers):
        mod = moe = None
        if i in capacity:
            mod = {"capacity": capacity[i], "router_weight": str(m.mod.router_weight), "causal": str(m.mod.causal),
                   "predictor_hidden": m.mod.predictor_hidden or max(m.hidden_size // 8, 1)}
        if i in derived.moe_layers:
            moe = {"num_experts": m.moe.num_experts, "top_k": m.moe.top_k, "pre_softmax": m.moe.top_k == 1,
                   "ffn_hidden_size": m.moe.ffn_hidden_size or derived.ffn_hidden_size,
                   "shared_ffn_hidden_size": m.moe.shared_expert_ffn_hidden_size,
                   "num_noop_experts": noop_columns(m) if m.moe.mode == "integrated" else 0}
        specs.append({"mod": mod, "moe": moe})
    return specs


def build_hf_model(state: Dict[str, torch.Tensor], cfg, derived, special: Dict[str, Optional[int]]):
    """(HF model with our weights, target); ``state``: the TP1 megatron state dict."""
    require("transformers", "safetensors")
    target, _ = choose_target(cfg, derived)
    m = cfg.model
    heads, groups, d = _heads(cfg)
    common = _common(cfg, derived, special)
    if target is HFTarget.llama:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(intermediate_size=derived.ffn_hidden_size, hidden_act="silu", rms_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
                             attention_bias=False, mlp_bias=False, **common)
        model_cls = LlamaForCausalLM
        hf_state = weights.megatron_to_llama(state, m.num_layers, heads, groups, d, m.tie_embeddings)
    elif target is HFTarget.mixtral:
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(intermediate_size=m.moe.ffn_hidden_size or derived.ffn_hidden_size, hidden_act="silu",
                               rms_norm_eps=1e-5, num_local_experts=m.moe.num_experts,
                               num_experts_per_tok=m.moe.top_k, router_jitter_noise=0.0,
                               rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
                               **common)
        model_cls = MixtralForCausalLM
        hf_state = weights.megatron_to_mixtral(state, m.num_layers, heads, groups, d, m.tie_embeddings,
                                               m.moe.num_experts)
    else:
        from mod_train.hf.remote.configuration_mod_train import ModTrainConfig
        from mod_train.hf.remote.modeling_mod_train import ModTrainForCausalLM

        config = ModTrainConfig(intermediate_size=derived.ffn_hidden_size, normalization=str(m.normalization),
                                norm_eps=1e-5, activation=str(m.activation),
                                position_embedding=str(m.position_embedding), rope_theta=float(m.rotary_base),
                                layers=layer_specs(cfg, derived), real_vocab_size=m.vocab_size, **common)
        config.auto_map = dict(AUTO_MAP)
        model_cls = ModTrainForCausalLM
        hf_state = dict(state)
    model = model_cls(config).float().eval()
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not (m.tie_embeddings and k in ("lm_head.weight",))]
    if missing or unexpected:
        raise HFExportError(f"{target.value}: the converted weights do not fit the Hugging Face model: "
                            f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    return model, target


def _special_ids(tokenizer_path: str) -> Dict[str, Optional[int]]:
    from mod_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids = {}
    for hf_name, ours in (("bos_token_id", "bos"), ("eos_token_id", "eod"), ("pad_token_id", "pad")):
        try:
            value = getattr(tok, ours)
        except Exception:  # noqa: BLE001 - a tokenizer without that special piece
            value = None
        ids[hf_name] = int(value) if value is not None and int(value) >= 0 else None
    return ids


def write_tokenizer(tokenizer_path: str, out: Path) -> None:
    """``out/tokenizer.json`` (+ ``tokenizer_config.json``): converted from sentencepiece, or copied."""
    from data_prep.encoders import HF_CONFIG_FILE, HF_TOKENIZER_FILE
    from data_prep.sp_to_hf import write
    from data_prep.encoders import TokenizerKind, resolve_tokenizer_file

    kind, file = resolve_tokenizer_file(tokenizer_path)
    if kind is TokenizerKind.HF:
        shutil.copyfile(file, out / HF_TOKENIZER_FILE)
        side = Path(file).parent / HF_CONFIG_FILE
        if side.exists():
            shutil.copyfile(side, out / HF_CONFIG_FILE)
        else:
            (out / HF_CONFIG_FILE).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    else:
        from data_prep._io import DataPrepError

        try:
            write(str(file), str(out))
        except DataPrepError as e:
            raise HFExportError(f"{e}. Pass --tokenizer with an equivalent tokenizer.json, or --no-tokenizer "
                                "to export the model alone") from None


def save_hf(model, target: HFTarget, out: Path, tokenizer_path: Optional[str], special: Dict[str, Optional[int]],
            real_vocab: int, padded_vocab: int) -> Path:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    gen = GenerationConfig(bos_token_id=special.get("bos_token_id"), eos_token_id=special.get("eos_token_id"),
                           pad_token_id=special.get("pad_token_id"),
                           suppress_tokens=list(range(real_vocab, padded_vocab)) or None)
    gen.save_pretrained(str(out))
    if target is HFTarget.mod_train:
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, out / name)
    if tokenizer_path:
        write_tokenizer(tokenizer_path, out)
    return out


def export_loaded_hf(loaded, out: Union[str, Path], tokenizer_path: Optional[str] = None,
                     with_tokenizer: bool = True) -> Tuple[Path, HFTarget]:
    """A loaded checkpoint (``mod_train.inference.loader.LoadedModel``) -> a transformers directory."""
    state = {k: v.detach().cpu().float().clone() for k, v in loaded.model.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    cfg, derived = loaded.config, loaded.derived
    special = _special_ids(tokenizer_path) if tokenizer_path else {}
    model, target = build_hf_model(state, cfg, derived, special)
    save_hf(model, target, Path(out), tokenizer_path if with_tokenizer else None, special,
            cfg.model.vocab_size or derived.padded_vocab_size,
            derived.padded_vocab_size)
    return Path(out), target


def export_checkpoint_hf(checkpoint: Union[str, Path], out: Union[str, Path], iteration: Optional[str] = "latest",
                         tokenizer_path: Optional[str] = None, with_tokenizer: bool = True) -> Tuple[Path, HFTarget]:
    """``mod-export --format hf``: checkpoint root or ``iter_*`` dir -> transformers directory, in this process
    (``with_tokenizer=False``: the model alone; the special ids still come from the tokenizer)."""
    from mod_train.distributed.world_of_one import world_of_one
    from mod_train.inference.loader import load_tokenizer_for, load_model, open_checkpoint

    require("transformers", "safetensors")
    source = open_checkpoint(checkpoint, iteration)
    _, vocab = load_tokenizer_for(source, tokenizer_path)
    path = tokenizer_path or source.config.data.tokenizer_model
    with world_of_one():
        loaded = load_model(source, vocab_size=vocab)
        return export_loaded_hf(loaded, out, path, with_tokenizer=with_tokenizer)
