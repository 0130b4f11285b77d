"""megatron-core TP / TP+SP / PP / EP (allgather, alltoall) on CPU with gloo, 2 processes.

One launch (imports cost ~5 s per process) runs every configuration in sequence, re-initialising
megatron's parallel_state in between; the tests assert on its per-rank results. Every parallel
run is compared with a single-layout reference computed in the same processes (TP=1, PP=1, EP=1,
all ranks being data-parallel replicas): same loss within 1e-5, and matching gradients.
"""

from __future__ import annotations

import math
import re
from functools import partial

import pytest

from tests.helpers import run_distributed

pytestmark = pytest.mark.slow

SEED = 1234
SEQ, MBS, VOCAB = 16, 2, 64
NUM_MICROBATCHES = 2
TOL = 1e-5


# ------------------------------------------------------------------ helpers run inside the ranks


def _config(**overrides):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, kv_channels=8, hidden_dropout=0.0, attention_dropout=0.0,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, deallocate_pipeline_outputs=False,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_overrides(dispatcher: str, ep: int) -> dict:
    return dict(
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
    )


def _init_parallel(tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, create_gloo_process_groups=False,
    )
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)


def _build(config):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True, position_embedding_type="rope",
    )


def _batches(seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        out.append(dict(ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                        pos=torch.arange(SEQ).expand(MBS, SEQ).contiguous()))
    return out


def _loss_func(output_tensor):
    loss = output_tensor.float().mean()
    # clone: the schedule divides the returned loss by num_microbatches in place.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["ids"], batch["pos"], None, labels=batch["labels"])
    return output, _loss_func


def _train_step(model, batches):
    """megatron's own schedule (1F1B for PP>1); the mean loss on the last stage, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=MBS,
    )
    if not losses:
        return None
    return float(sum(d["lm loss"] for d in losses) / len(losses))


def _tp_grad_sq_norm(model) -> float:
    """Squared norm of the full-model gradient, from TP shards (replicated params counted once)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    dist.all_reduce(sharded, group=ps.get_tensor_model_parallel_group())
    return float(sharded + replicated)


def _allreduce_sequence_parallel_grads(model) -> int:
    """What megatron's finalize_model_grads does for SP: sum replicated-param grads over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    params = [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    for p in params:
        dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return len(params)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _reference_name(model, name: str, num_local_experts: int, ep_rank: int) -> str:
    """Name in the single-layout model of this (PP stage / EP rank) model's parameter ``name``."""
    m = _LAYER.match(name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = _LAYER.sub(f"decoder.layers.{layer.layer_number - 1}.", name, count=1)
    m = _LOCAL_EXPERT.search(name)
    if m:
        name = _LOCAL_EXPERT.sub(
            f".local_experts.{ep_rank * num_local_experts + int(m.group(1))}.", name, count=1)
    if name == "output_layer.weight" and not model.pre_process:
        name = "embedding.word_embeddings.weight"  # tied embedding, duplicated on the last stage
    return name


def _load_from_reference(model, ref_state, num_local_experts=0, ep_rank=0) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ref_state[_reference_name(model, name, num_local_experts, ep_rank)])


# ------------------------------------------------------------------ scenarios


def _dense_tp(rank: int) -> dict:
    from megatron.core import parallel_state as ps

    batches = _batches(SEED)  # same data on both ranks: they are one TP group
    _init_parallel(tp=1)
    ref = _build(_config())
    ref_loss = _train_step(ref, batches)
    ref_gsq = _tp_grad_sq_norm(ref)

    _init_parallel(tp=2)
    tp = _build(_config(tensor_model_parallel_size=2))
    tp_loss = _train_step(tp, batches)
    tp_gsq = _tp_grad_sq_norm(tp)
    tp_rank = ps.get_tensor_model_parallel_rank()

    _init_parallel(tp=2)
    sp = _build(_config(tensor_model_parallel_size=2, sequence_parallel=True))
    sp_loss = _train_step(sp, batches)
    sp_marked = _allreduce_sequence_parallel_grads(sp)
    sp_gsq = _tp_grad_sq_norm(sp)
    return dict(ref_loss=ref_loss, ref_gsq=ref_gsq, tp_loss=tp_loss, tp_gsq=tp_gsq,
                tp_rank=tp_rank, sp_loss=sp_loss, sp_gsq=sp_gsq, sp_marked=sp_marked)


def _dense_pp(rank: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    batches = _batches(SEED)
    _init_parallel()
    ref = _build(_config(num_layers=4))
    ref_loss = _train_step(ref, batches)
    ref_state = {k: v.detach().clone() for k, v in ref.named_parameters()}
    ref_layer_grad_sq = {}
    for name, p in ref.named_parameters():
        m = _LAYER.match(name)
        if m:
            ref_layer_grad_sq[int(m.group(1))] = (
                ref_layer_grad_sq.get(int(m.group(1)), 0.0) + float(p.grad.double().pow(2).sum()))

    _init_parallel(pp=2)
    stage = _build(_config(num_layers=4, pipeline_model_parallel_size=2))
    # The tied embedding's copy on the last stage was all-reduced from the first stage at build.
    if stage.pre_process:
        shared = stage.embedding.word_embeddings.weight.detach().clone()
    else:
        shared = stage.output_layer.weight.detach().clone()
    first = shared.clone()
    dist.broadcast(first, src=ps.get_pipeline_model_parallel_first_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    tied_ok = bool(torch.equal(shared, first)) and float(shared.abs().sum()) > 0

    _load_from_reference(stage, ref_state)
    pp_loss = _train_step(stage, batches)
    layer_grad_sq = {}
    for name, p in stage.named_parameters():
        m = _LAYER.match(name)
        if m:
            g = stage.decoder.layers[int(m.group(1))].layer_number - 1
            layer_grad_sq[g] = layer_grad_sq.get(g, 0.0) + float(p.grad.double().pow(2).sum())
    return dict(ref_loss=ref_loss, pp_loss=pp_loss, tied_ok=tied_ok,
                pp_rank=ps.get_pipeline_model_parallel_rank(),
                layer_grad_sq=layer_grad_sq, ref_layer_grad_sq=ref_layer_grad_sq)


def _moe(rank: int, dispatcher: str) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    batches = _batches(SEED + rank)  # EP ranks are data-parallel: different tokens per rank
    _init_parallel()
    ref = _build(_config(**_moe_overrides(dispatcher, ep=1)))
    ref_loss = _train_step(ref, batches)
    ref_state = {k: v.detach().clone() for k, v in ref.named_parameters()}
    # An expert's gradient under EP collects the tokens of every rank routed to it.
    ref_expert_grads = {}
    for name, p in ref.named_parameters():
        if ".local_experts." in name:
            g = p.grad.detach().clone()
            dist.all_reduce(g)
            ref_expert_grads[name] = g

    _init_parallel(ep=2)
    model = _build(_config(**_moe_overrides(dispatcher, ep=2)))
    ep_rank = ps.get_expert_model_parallel_rank()
    _load_from_reference(model, ref_state, num_local_experts=2, ep_rank=ep_rank)
    loss = _train_step(model, batches)
    max_expert_grad_diff, n_experts = 0.0, 0
    for name, p in model.named_parameters():
        if ".local_experts." in name:
            ref_g = ref_expert_grads[_reference_name(model, name, 2, ep_rank)]
            max_expert_grad_diff = max(max_expert_grad_diff, float((p.grad - ref_g).abs().max()))
            n_experts += 1
    router_grad_finite = all(
        bool(torch.isfinite(p.grad).all()) for n, p in model.named_parameters() if "router" in n)
    return dict(ref_loss=ref_loss, loss=loss, max_expert_grad_diff=max_expert_grad_diff,
                n_expert_params=n_experts, router_grad_finite=router_grad_finite, ep_rank=ep_rank)


def _all_scenarios(rank: int, world_size: int) -> dict:
    import time

    from mod_train.compat import apply_cpu_patches

    apply_cpu_patches()
    out, seconds = {}, {}
    for key, fn in [("tp", _dense_tp), ("pp", _dense_pp),
                    ("ep_allgather", partial(_moe, dispatcher="allgather")),
                    ("ep_alltoall", partial(_moe, dispatcher="alltoall"))]:
        start = time.perf_counter()
        out[key] = fn(rank)
        seconds[key] = time.perf_counter() - start
    out["seconds"] = seconds
    return out


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_scenarios, 2, timeout_s=150)


def _close(a: float, b: float, tol: float = TOL) -> bool:
    return a is not None and b is not None and math.isfinite(a) and abs(a - b) <= tol


def test_tensor_parallel_matches_single_process(results):
    for r in results:
        t = r["tp"]
        assert _close(t["tp_loss"], t["ref_loss"]), t
        assert math.isclose(t["tp_gsq"], t["ref_gsq"], rel_tol=1e-5), t
    assert sorted(r["tp"]["tp_rank"] for r in results) == [0, 1]


def test_tensor_parallel_with_sequence_parallel_matches_single_process(results):
    for r in results:
        t = r["tp"]
        assert _close(t["sp_loss"], t["ref_loss"]), t
        # RMSNorm weights (2 per layer + final) are replicated with partial grads under SP.
        assert t["sp_marked"] == 5, t
        assert math.isclose(t["sp_gsq"], t["ref_gsq"], rel_tol=1e-5), t


def test_pipeline_parallel_matches_single_process(results):
    by_stage = {r["pp"]["pp_rank"]: r["pp"] for r in results}
    assert sorted(by_stage) == [0, 1]
    assert by_stage[0]["pp_loss"] is None  # the loss lives on the last stage only
    last = by_stage[1]
    assert _close(last["pp_loss"], last["ref_loss"]), last
    assert all(s["tied_ok"] for s in by_stage.values()), "tied embedding not synced across stages"
    assert sorted(by_stage[0]["layer_grad_sq"]) == [0, 1]
    assert sorted(by_stage[1]["layer_grad_sq"]) == [2, 3]
    for s in by_stage.values():
        for layer, gsq in s["layer_grad_sq"].items():
            assert math.isclose(gsq, s["ref_layer_grad_sq"][layer], rel_tol=1e-5), (layer, s)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_expert_parallel_matches_single_process(results, dispatcher):
    ep = [r[f"ep_{dispatcher}"] for r in results]
    assert sorted(e["ep_rank"] for e in ep) == [0, 1]
    for e in ep:
        assert _close(e["loss"], e["ref_loss"]), e
        assert e["n_expert_params"] == 2 * 2 * 2, e  # layers x local experts x (fc1, fc2)
        assert e["max_expert_grad_diff"] < TOL, e
        assert e["router_grad_finite"], e
    assert ep[0]["loss"] != ep[1]["loss"]  # the ranks really saw different tokens
