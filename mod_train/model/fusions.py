"""Which fused kernels and which fp8 recipe a run uses: decided once, before any process group.

megatron-core's TransformerConfig has switches for fused paths (``bias_activation_fusion``,
``bias_dropout_fusion``, ``apply_rope_fusion``, ``persist_layer_norm``, ``masked_softmax_fusion``,
``gradient_accumulation_fusion``) and for Transformer Engine's fp8 (``fp8``, ``fp8_recipe``). Each
one needs a kernel that may or may not be installed. This module splits the decision in two:

* :func:`probe` looks at this machine once (CUDA, Transformer Engine and its version, TE's own fp8
  check, apex's fused layer norm, Triton for megatron's ``torch.compile`` fusions);
* :func:`decide` is a pure function from that :class:`Availability` and the model's settings to a
  :class:`FusionPlan` of on/off decisions with their reasons (unit-tested with a CPU and a GPU+TE
  availability), and :func:`fp8_refusal` says why ``train.precision=fp8`` cannot run here.

``validate`` computes the plan once and hands it around in ``Derived``; ``build.transformer_config``
applies it, the trainer logs :func:`describe` once at start and the tracker records
:func:`as_params`. ``moe_grouped_gemm`` is decided in ``expert_mlp.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

# Transformer Engine versions megatron-core 0.16.1 checks for these paths.
_TE_FUSED_ROPE = (1, 4)  # fused_apply_rotary_pos_emb (TransformerConfig.__post_init__)
_TE_FP8_MOE = (1, 7)  # fp8 with MoE layers (TransformerConfig.__post_init__)
_TE_FP8_CURRENT = (2, 2)  # the per-tensor current-scaling recipe (fp8_utils: Fp8Recipe.tensorwise)


@dataclass(frozen=True)
class Availability:
    """What this machine offers (see :func:`probe`); tests pass their own."""

    cuda: bool
    te_version: Optional[Tuple[int, int]] = None  # None: transformer_engine is not importable
    fp8_device: bool = False  # TE's check_fp8_support(): a GPU with fp8 tensor cores (sm_89+)
    fp8_device_reason: str = "no CUDA device"
    triton: bool = False  # torch.compile's GPU backend, which megatron's jit_fuser uses
    apex_persist_layer_norm: bool = False  # apex's persistent LayerNorm kernel (FastLayerNormFN)
    # False: validating for other machines (mod-submit on a login node passes the allocation's
    # CUDA): the kernels there are unknown here, so fp8 is checked again when the run starts.
    this_machine: bool = True


@dataclass(frozen=True)
class Decision:
    on: bool
    reason: str

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.reason})"


@dataclass(frozen=True)
class FusionPlan:
    """One decision per megatron TransformerConfig switch (field name = megatron's name)."""

    bias_activation_fusion: Decision
    bias_dropout_fusion: Decision
    apply_rope_fusion: Decision
    persist_layer_norm: Decision
    masked_softmax_fusion: Decision
    gradient_accumulation_fusion: Decision
    fp8: Decision  # on: megatron's fp8="hybrid" with fp8_recipe below
    fp8_recipe: Optional[str] = None  # megatron's name: "delayed" | "tensorwise"

    def transformer_config_kwargs(self) -> dict:
        kwargs = {f.name: getattr(self, f.name).on for f in fields(self) if f.name not in ("fp8", "fp8_recipe")}
        if self.fp8.on:
            # hybrid: E4M3 for activations and weights, E5M2 (more range) for the gradients.
            kwargs.update(fp8="hybrid", fp8_recipe=self.fp8_recipe)
        return kwargs

    def decisions(self) -> Dict[str, Decision]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fp8_recipe"}


# train.fp8_recipe -> megatron's Fp8Recipe name
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


def _te_text(v: Optional[Tuple[int, int]]) -> str:
    return "no Transformer Engine" if v is None else f"Transformer Engine {v[0]}.{v[1]}"


def fp8_refusal(avail: Availability, recipe: str = "delayed", has_moe: bool = False) -> Optional[str]:
    """None where Transformer Engine's fp8 can run here with ``recipe``; else why not and what to do."""
    fix = "Use train.precision=bf16 (or auto) here."
    if avail.te_version is None:
        return (f"train.precision=fp8 runs the matmuls in Transformer Engine's fp8 kernels, and transformer_engine "
                f"is not importable here. Install Transformer Engine on a GPU machine (fp8 needs Ada/Hopper or "
                f"newer). {fix}")
    if not avail.cuda:
        return f"train.precision=fp8 needs a CUDA GPU (Transformer Engine's fp8 kernels), and there is none. {fix}"
    if not avail.fp8_device:
        return f"train.precision=fp8: Transformer Engine says this GPU cannot run fp8: {avail.fp8_device_reason}. {fix}"
    if recipe == "current" and avail.te_version < _TE_FP8_CURRENT:
        return (f"train.fp8_recipe=current (per-tensor current scaling) needs Transformer Engine >= 2.2, found "
                f"{_te_text(avail.te_version)}: set train.fp8_recipe=delayed or upgrade Transformer Engine.")
    if has_moe and avail.te_version < _TE_FP8_MOE:
        return (f"train.precision=fp8 with MoE layers needs Transformer Engine >= 1.7 (megatron-core), found "
                f"{_te_text(avail.te_version)}: upgrade it or use train.precision=bf16.")
    return None


def decide(avail: Availability, *, activation: str, position_embedding: str, normalization: str,
           mod: bool = False, fp8: bool = False, fp8_recipe: str = "delayed") -> FusionPlan:
    """The fused paths this run uses. Pure: the same inputs give the same plan on every rank.

    ``fp8`` must already have passed :func:`fp8_refusal` (validate.py refuses it otherwise).
    """
    # Transformer Engine's layer spec (fused norms + linears, its attention) is used exactly where
    # TE is importable and CUDA present (specs.py); otherwise megatron's local modules with SDPA.
    te_spec = avail.cuda and avail.te_version is not None

    # megatron's bias-SwiGLU/GeLU and bias-dropout-add fusions are torch.compile'd functions
    # (megatron.core.jit.jit_fuser); their kernels come from Triton on a GPU. On CPU, compiling
    # them would need a C++ toolchain at start and buys nothing at our sizes.
    if not avail.cuda:
        compiled = Decision(False, "no CUDA device")
    elif not avail.triton:
        compiled = Decision(False, "Triton, torch.compile's GPU backend, not importable")
    else:
        compiled = Decision(True, "torch.compile + Triton, megatron jit_fuser")
    if activation == "gelu" and compiled.on:
        # megatron: fused GeLU without GLU needs a bias on linear_fc1; mod-train's linears have none.
        bias_act = Decision(False, "gelu without a linear bias, which megatron's fused GeLU needs")
    else:
        bias_act = compiled

    if position_embedding != "rope":
        rope = Decision(False, "no rotary embeddings")
    elif mod:
        # A MoD layer hands its routed tokens their own positions' frequencies, [k, b, 1, d] (mod.py);
        # TE's fused kernel takes one [s, 1, 1, d] table for the whole batch.
        rope = Decision(False, "MoD layers rotate routed tokens with per-sample frequencies")
    elif not avail.cuda:
        rope = Decision(False, "no CUDA device")
    elif avail.te_version is None or avail.te_version < _TE_FUSED_ROPE:
        rope = Decision(False, f"{_te_text(avail.te_version)}; fused RoPE needs TE >= 1.4")
    else:
        rope = Decision(True, f"{_te_text(avail.te_version)} fused RoPE")

    if te_spec:
        persist = Decision(False, "TE layer spec: its own fused norms")
    elif normalization != "LayerNorm":
        persist = Decision(False, "RMSNorm; the persistent kernel is apex's LayerNorm")
    elif not avail.cuda or not avail.apex_persist_layer_norm:
        persist = Decision(False, "apex FastLayerNorm not importable" if avail.cuda else "no CUDA device")
    else:
        # megatron still skips it for hidden sizes its kernel was not built for.
        persist = Decision(True, "apex persistent LayerNorm")

    # The flag only selects megatron's own DotProductAttention softmax kernel; our attention is TE's
    # (TE spec) or torch SDPA (local spec, attention.py), neither reads it.
    softmax = Decision(False, "core attention is " + ("TE DotProductAttention" if te_spec else "torch SDPA"))

    # The fused weight-gradient GEMM accumulates into megatron DDP's param.main_grad; DeepSpeed owns
    # the gradients here and provides no main_grad.
    grad_acc = Decision(False, "DeepSpeed reduces gradients, no megatron DDP main_grad")

    if fp8:
        fp8_dec = Decision(True, f"{_te_text(avail.te_version)}, {fp8_recipe} scaling, hybrid E4M3/E5M2")
    else:
        fp8_dec = Decision(False, "train.precision is not fp8")
    return FusionPlan(bias_activation_fusion=bias_act, bias_dropout_fusion=compiled, apply_rope_fusion=rope,
                      persist_layer_norm=persist, masked_softmax_fusion=softmax,
                      gradient_accumulation_fusion=grad_acc, fp8=fp8_dec,
                      fp8_recipe=FP8_RECIPES[fp8_recipe] if fp8 else None)


def probe(has_cuda: Optional[bool] = None) -> Availability:
    """What this machine offers. ``has_cuda``: what the run's machines have, where the caller knows;
    one that differs from this machine's means the run is for other machines (nothing probed)."""
    import importlib.util

    import torch

    local_cuda = torch.cuda.is_available()
    if has_cuda is not None and has_cuda != local_cuda:
        return Availability(cuda=has_cuda, fp8_device_reason="not probed (another machine)", this_machine=False)
    cuda = local_cuda
    te_version = _te_version()
    fp8_device, fp8_reason = False, "no CUDA device"
    if cuda and te_version is not None:
        fp8_device, fp8_reason = _te_fp8_support()
    triton = importlib.util.find_spec("triton") is not None
    # megatron's FusedLayerNorm takes apex; its persistent path apex.contrib's fast_layer_norm extension.
    apex_ln = all(importlib.util.find_spec(m) is not None for m in ("apex", "fast_layer_norm"))
    return Availability(cuda=cuda, te_version=te_version, fp8_device=fp8_device, fp8_device_reason=fp8_reason,
                        triton=triton, apex_persist_layer_norm=apex_ln)


def _te_version() -> Optional[Tuple[int, int]]:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE built against another torch/CUDA failing at import
        return None
    from megatron.core.utils import get_te_version

    v = get_te_version()
    return (v.major, v.minor)


def _te_fp8_support() -> Tuple[bool, str]:
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError:  # newer TE moved it
        from transformer_engine.pytorch.quantization import check_fp8_support
    ok, reason = check_fp8_support()
    return bool(ok), str(reason or "supported")


def describe(plan: FusionPlan) -> str:
    """The start-up line, e.g. ``fusions: bias_activation=off (no CUDA device), ...``."""
    short = {name.replace("_fusion", ""): d for name, d in plan.decisions().items()}
    return "fusions: " + ", ".join(f"{name}={d}" for name, d in short.items())


def as_params(plan: FusionPlan) -> Dict[str, str]:
    """Tracking parameters ``fusions.<switch>: on|off``."""
    out = {f"fusions.{name}": "on" if d.on else "off" for name, d in plan.decisions().items()}
    if plan.fp8.on:
        out["fusions.fp8_recipe"] = str(plan.fp8_recipe)
    return out
