"""Which expert MLP megatron-core runs in an MoE layer: grouped GEMM or the sequential experts.

``model.moe.grouped_gemm=true`` asks for megatron-core's ``TEGroupedMLP``: all local experts in one
Transformer Engine grouped GEMM (``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear``)
instead of ``SequentialMLP``'s loop of one GEMM per expert. It exists only where TE (>= 1.7, with
``GroupedLinear``) is importable and a CUDA device is present; everywhere else (this CPU machine)
the run falls back to the sequential experts and says so once at start (:func:`describe`).

megatron-core 0.16.1 has a second grouped path, the legacy ``GroupedMLP`` over the ``grouped_gemm``
package; it is not used: deprecated upstream since 0.12, it asserts bf16 in its forward (no fp32
run, so no CPU/fp32 equivalence test could cover it) and megatron documents that its optimizer
state is not interchangeable with ``SequentialMLP``'s, which our layout-free ``optimizer/`` copy
relies on. ``TEGroupedMLP``'s sharded state dict uses ``SequentialMLP``'s keys
(``experts.linear_fc1.weight`` with the global expert index as a sharded axis), so checkpoints
move between grouped and sequential experts without conversion.

The decision is a pure function of what is importable, so the spec (``specs.py``) and the
TransformerConfig (``build.py``) agree without passing state around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ExpertMLPChoice:
    grouped: bool  # TEGroupedMLP (True) or SequentialMLP
    reason: str  # why, for the start-up line and a skipped test


def grouped_gemm_missing() -> Optional[str]:
    """None where megatron's TEGroupedMLP can run here, else what is missing (the import first)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        return f"transformer_engine is not importable ({e}), which megatron's TEGroupedMLP needs"
    from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear

    if TEColumnParallelGroupedLinear is None:
        return ("the installed transformer_engine has no GroupedLinear (megatron's TEGroupedMLP needs "
                "transformer_engine >= 1.7)")
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (Transformer Engine's grouped GEMM runs on GPUs only)"
    return None


def choose_expert_mlp(grouped_gemm: bool) -> ExpertMLPChoice:
    if not grouped_gemm:
        return ExpertMLPChoice(False, "model.moe.grouped_gemm=false")
    missing = grouped_gemm_missing()
    if missing is None:
        return ExpertMLPChoice(True, "Transformer Engine grouped GEMM (megatron-core TEGroupedMLP)")
    return ExpertMLPChoice(False, missing)


def describe(choice: ExpertMLPChoice) -> str:
    """The start-up line for a run that asked for grouped GEMM."""
    if choice.grouped:
        return f"model.moe.grouped_gemm=true: experts use {choice.reason}"
    return (f"model.moe.grouped_gemm=true: falling back to the sequential experts (megatron-core "
            f"SequentialMLP): {choice.reason}")
