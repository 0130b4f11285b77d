"""no-TE family: gaps megatron-core leaves when Transformer Engine is not installed, on ANY device.

These are not CPU adaptations: a GPU image without Transformer Engine needs them too, so the
registry applies them whenever ``transformer_engine`` cannot be imported
(:func:`mod_train.compat.apply_missing_te_patches`), and on CPU as part of the CPU set.
"""

from __future__ import annotations

from typing import Tuple

from mod_train.compat.patch import Family, Patch, module, require_attr, require_module

__all__ = ["PATCHES"]

_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"


# moe-te-general-gemm: moe_utils.py binds `te_general_gemm` only inside
# `try: import transformer_engine ...`, but `RouterGatingLinearFunction.forward` always evaluates
# `te_general_gemm is not None` -> NameError in every MoE router without Transformer Engine.
# Bind it to None, which selects upstream's own torch.mm/addmm fallback.
def _apply_moe_te_general_gemm() -> None:
    moe_utils = module(_MOE_UTILS)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _check_moe_te_general_gemm() -> None:
    moe_utils = module(_MOE_UTILS)
    require_module(_MOE_UTILS, "        te_general_gemm,\n    )\n\n    HAVE_TE = True")
    require_attr(moe_utils.RouterGatingLinearFunction, "forward",
                 "if te_general_gemm is not None", "torch.mm(inp.to(router_dtype)")


PATCHES: Tuple[Patch, ...] = (
    Patch("moe-te-general-gemm", Family.no_te, f"{_MOE_UTILS}.te_general_gemm (unbound without TE)",
          _apply_moe_te_general_gemm, _check_moe_te_general_gemm, cpu_only=False),
)
