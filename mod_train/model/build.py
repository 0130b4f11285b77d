"""Build megatron-core's GPTModel (one per virtual pipeline stage) from our typed config."""

from __future__ import annotations

import logging
from typing import List

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from mod_train.config.schema import Config, MoEConfig, RecomputeConfig
from mod_train.config.validate import Derived, expert_tensor_parallel_size
from mod_train.model.expert_mlp import choose_expert_mlp, describe
from mod_train.model.specs import decoder_block_spec

log = logging.getLogger(__name__)


def load_balancing_kwargs(moe: MoEConfig) -> dict:
    """megatron's router settings for ``model.moe.load_balancing``."""
    if moe.load_balancing == "expert_bias":
        # Aux-loss-free balancing: megatron adds the bias to sigmoid scores for the top-k choice
        # only (it requires the sigmoid score function); the combine weights stay the scores.
        # The bias is moved after each applied step by model/expert_bias.py.
        return dict(moe_router_load_balancing_type="none", moe_router_score_function="sigmoid",
                    moe_router_enable_expert_bias=True, moe_router_bias_update_rate=moe.bias_update_rate)
    return dict(moe_router_load_balancing_type=str(moe.load_balancing),
                # megatron-core requires it for top-1 (a softmax over one selected logit has no gradient).
                moe_router_pre_softmax=moe.top_k == 1)


def recompute_kwargs(rc: RecomputeConfig) -> dict:
    """megatron's recompute_* settings for ``model.recompute`` (validated in validate.py)."""
    if rc.granularity is None:
        return {}
    if rc.granularity == "full":
        return dict(recompute_granularity="full", recompute_method=str(rc.method),
                    recompute_num_layers=rc.num_layers)
    return dict(recompute_granularity="selective", recompute_modules=[str(x) for x in rc.modules])


def transformer_config(cfg: Config, derived: Derived) -> TransformerConfig:
    m, par = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if derived.bf16 else torch.float32
    moe_kwargs = {}
    if m.moe.num_experts > 0:
        moe_kwargs = dict(
            num_moe_experts=m.moe.num_experts,
            moe_router_topk=m.moe.top_k,
            moe_aux_loss_coeff=m.moe.aux_loss_coeff,
            moe_z_loss_coeff=m.moe.z_loss_coeff,
            moe_expert_capacity_factor=m.moe.capacity_factor,
            moe_token_dispatcher_type=m.moe.token_dispatcher,
            moe_ffn_hidden_size=m.moe.ffn_hidden_size or derived.ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe.shared_expert_ffn_hidden_size,
            **load_balancing_kwargs(m.moe),
            # TEGroupedMLP where TE's grouped GEMM is importable, else SequentialMLP (expert_mlp.py).
            moe_grouped_gemm=choose_expert_mlp(m.moe.grouped_gemm).grouped,
            # Router logits, softmax and top-k in fp32 whatever the training precision (bf16 logits tie).
            moe_router_dtype="fp32",
        )
        if m.moe.capacity_factor is not None:
            moe_kwargs["moe_pad_expert_input_to_capacity"] = False
            moe_kwargs["moe_token_drop_policy"] = "probs"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=derived.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        # Fused kernels and fp8 as validate decided them from what is installed (model/fusions.py).
        **derived.fusions.transformer_config_kwargs(),
        init_method_std=m.init_method_std,
        # Weights are drawn in full on the CPU and then split, so the initial model does not
        # depend on the TP size (megatron-core's layout-independent initialisation).
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=derived.bf16,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=expert_tensor_parallel_size(par),
        sequence_parallel=par.sequence_parallel,
        deallocate_pipeline_outputs=False,
        # Interleaved schedule with pp=2: both neighbours are the same rank, and in one exchange
        # that rank sends an activation (send_next) and a gradient (send_prev) of the same shape.
        # batch_isend_irecv issues send_prev first while the receiver posts recv_prev first, so on
        # gloo the gradient lands in the activation buffer. megatron's unbatched path orders the
        # ops by rank parity (and splits the directions over two communicators for a group of 2).
        batch_p2p_comm=par.vpp is None,
        **recompute_kwargs(m.recompute),
        **moe_kwargs,
    )


def build_model_chunks(cfg: Config, derived: Derived) -> List[GPTModel]:
    """The GPTModel chunks this rank holds: one, or ``vpp`` with the interleaved schedule.

    Needs megatron's parallel_state initialised. Parameters are drawn from torch's default CPU
    generator, which the caller seeds identically on every rank.
    """
    config = transformer_config(cfg, derived)
    m = cfg.model
    if m.moe.num_experts > 0 and m.moe.grouped_gemm:
        choice = choose_expert_mlp(True)
        # A fallback is a warning: the run is slower than asked for (shown on rank 0 only).
        (log.info if choice.grouped else log.warning)(describe(choice))
    vpp = cfg.parallel.vpp or 1
    chunks = []
    for vp_stage in range(vpp):
        vp = vp_stage if cfg.parallel.vpp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(m, derived, config, vp_stage=vp,
                                                      document_mask=cfg.data.reset_attention_mask),
            vocab_size=derived.padded_vocab_size,
            max_sequence_length=m.seq_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type=m.position_embedding,
            rotary_base=m.rotary_base,
            vp_stage=vp,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def count_parameters(chunks: List[torch.nn.Module]) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for c in chunks for p in c.parameters())
