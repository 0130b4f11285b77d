"""Activation recomputation (model.recompute) on real megatron-core models, single process.

A 2-layer model whose layer 0 is an MoE layer and layer 1 a MoD layer (capacity 0.25) trains two
micro-batches in pipeline order (forward A, forward B, backward A, backward B): with full and
selective recomputation every gradient is bitwise the one without, the MoD layer selects its
top-k set once per micro-batch and its recompute routes exactly that set, and routing statistics
and calibration observations are recorded once per micro-batch with the same values.
"""

from collections import defaultdict

import pytest
import torch
from megatron.core.tensor_parallel import random as megatron_random

import mod_train.model.mod as mod_module
from mod_train.config import ConfigError, validate
from mod_train.config.load import compose, to_config
from mod_train.model.build import build_model_chunks
from mod_train.model.mod import MoDTransformerLayer
from mod_train.model.recompute import RoutingStash, StaleRecomputeState, check_drained, stashes_of
from mod_train.model.routing_stats import RoutingStatsSource

S, B = 16, 2
BASE = ["model=tiny_mod", "model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2",
        f"model.seq_length={S}", "model.mod.capacity=0.25", "model.moe.num_experts=4", "model.moe.layers=[0]"]
SETTINGS = {
    "none": [],
    "full_uniform": ["model.recompute.granularity=full"],
    "selective": ["model.recompute.granularity=selective", "model.recompute.modules=[core_attn,mlp,moe]"],
}


def build(setting: str, state=None):
    cfg = to_config(compose(BASE + SETTINGS[setting]))
    derived = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    torch.manual_seed(0)
    model = build_model_chunks(cfg, derived)[0]
    if state is not None:
        model.load_state_dict(state)
    return model.train()


class CountingSink:
    def __init__(self):
        self.values = defaultdict(list)

    def record(self, name, value):
        self.values[name].append(value.detach().clone())


def train_two_microbatches(model, monkeypatch):
    """Forward A, forward B, backward A, backward B (1F1B order). Returns what was observed."""
    seen = {"topk": 0, "gathered": [], "observed": []}
    topk, gather = mod_module.topk_indices, mod_module.gather_tokens

    def counting_topk(logits, k):
        seen["topk"] += 1
        return topk(logits, k)

    def recording_gather(x, idx):
        seen["gathered"].append(idx.clone())
        return gather(x, idx)

    monkeypatch.setattr(mod_module, "topk_indices", counting_topk)
    monkeypatch.setattr(mod_module, "gather_tokens", recording_gather)
    sink = CountingSink()
    for m in model.modules():
        if isinstance(m, RoutingStatsSource):
            m.connect_stats_sink(sink)
    mod_layer = next(m for m in model.modules() if isinstance(m, MoDTransformerLayer))
    observe = mod_layer.router.observe
    monkeypatch.setattr(mod_layer.router, "observe",
                        lambda logits, share: (seen["observed"].append(logits.detach().clone()), observe(logits, share)))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        tokens = torch.randint(0, 128, (B, S), generator=g)
        losses.append(model(tokens, torch.arange(S).expand(B, S), None, labels=tokens).mean())
    for loss in losses:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return seen, sink.values, grads, [float(x) for x in losses]


@pytest.mark.parametrize("setting", ["full_uniform", "selective"])
def test_recompute_trains_bitwise_like_no_recompute_and_reuses_the_routing(megatron_tp1, monkeypatch, setting):
    ref_model = build("none")
    ref, ref_stats, ref_grads, ref_losses = train_two_microbatches(ref_model, monkeypatch)
    monkeypatch.undo()
    model = build(setting, ref_model.state_dict())
    got, stats, grads, losses = train_two_microbatches(model, monkeypatch)

    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    router = next(n for n in grads if n.endswith("router.linear.weight"))
    assert grads[router].abs().sum() > 0  # LM + auxiliary BCE gradient, each attached once

    # One top-k selection per micro-batch; the recompute routes the forward's set.
    assert got["topk"] == ref["topk"] == 2
    if setting.startswith("full"):
        fwd_a, fwd_b, again_a, again_b = got["gathered"]
        assert torch.equal(again_a, fwd_a) and torch.equal(again_b, fwd_b) and not torch.equal(fwd_a, fwd_b)
        assert all(torch.equal(x, y) for x, y in zip((fwd_a, fwd_b), ref["gathered"]))
    else:
        assert all(torch.equal(x, y) for x, y in zip(got["gathered"], ref["gathered"], strict=True))
    # Statistics (MoD and MoE) and calibration observations: once per micro-batch, the same values.
    assert stats.keys() == ref_stats.keys() and any(k.startswith("moe/") for k in stats)
    for name, values in ref_stats.items():
        assert len(stats[name]) == len(values) == 2, name
        assert all(torch.equal(x, y) for x, y in zip(stats[name], values)), name
    assert len(got["observed"]) == 2 and all(torch.equal(x, y) for x, y in zip(got["observed"], ref["observed"]))
    assert all(len(s) == 0 for s in stashes_of([model]))


def test_a_stale_routing_decision_is_never_used_silently(megatron_tp1):
    model = build("full_uniform")
    stash = stashes_of([model])
    assert len(stash) == 1
    tokens = torch.randint(0, 128, (B, S))
    # A training-mode forward whose backward never runs leaves its selection behind ...
    with torch.no_grad():
        model(tokens, torch.arange(S).expand(B, S), None, labels=tokens)
    assert len(stash[0]) == 1
    with pytest.raises(StaleRecomputeState, match=r"training step 3: .*MoD layer 2: 1; cleared"):
        check_drained(stash, "training step 3")  # ... which the training step refuses, and clears
    assert len(stash[0]) == 0

    # A recompute never takes another micro-batch's selection of another shape.
    with torch.no_grad():
        model(tokens, torch.arange(S).expand(B, S), None, labels=tokens)
    one = tokens[:1]
    loss = model(one, torch.arange(S).expand(1, S), None, labels=one).mean()
    try:
        with pytest.raises(StaleRecomputeState, match=r"shape \(2, 4\) but the recompute routes \[batch 1, k 4\]"):
            loss.backward()
    finally:
        # megatron's CheckpointFunction.backward sets its is-checkpointing flag and clears it only
        # on the way out, so the raise leaves it set (a run ends there); this process runs other
        # tests, whose MoD layers would all take their forward for a recompute.
        assert megatron_random.is_checkpointing()
        megatron_random.IS_CHECKPOINTING = False

    empty = RoutingStash("MoD layer 9")
    with pytest.raises(StaleRecomputeState, match="MoD layer 9: recompute without a stashed routing decision"):
        empty.pop(1, 4, 16)


def check(*overrides, world_size=1):
    return validate(to_config(compose(["model.vocab_size=500", *overrides])), world_size=world_size,
                    check_files=False, has_cuda=False)


@pytest.mark.parametrize("overrides,world,needle", [
    (["model.recompute.num_layers=2"], 1, "model.recompute.num_layers set but model.recompute.granularity is null"),
    (["model.recompute.granularity=full", "model.recompute.num_layers=3"], 1,
     "num_layers=3 layers, which must divide the 4 layers of each pipeline stage"),
    (["model.recompute.granularity=full", "model.recompute.num_layers=4", "parallel.pp=2"], 2,
     "which must divide the 2 layers of each pipeline stage"),
    (["model.recompute.granularity=full", "model.recompute.method=block", "model.recompute.num_layers=3",
      "model.num_layers=8", "parallel.pp=2", "parallel.vpp=2", "parallel.global_batch_size=8"], 2,
     "recomputes model.recompute.num_layers=3 layers per pipeline stage, which has 2"),
    (["model.recompute.granularity=full", "model.recompute.modules=[mlp]"], 1, "model.recompute.modules=['mlp'] is for"),
    (["model.recompute.granularity=selective", "model.recompute.num_layers=2"], 1,
     "selective recomputes model.recompute.modules in every layer"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[]"], 1, "with no model.recompute.modules"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[moe]"], 1, "and the model has none"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[mlp]", "model.moe.num_experts=2"], 1,
     "every layer is an MoE layer"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[shared_experts]",
      "model.moe.num_experts=2"], 1, "model.moe.shared_expert_ffn_hidden_size is null"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[moe,shared_experts]",
      "model.moe.num_experts=2", "model.moe.shared_expert_ffn_hidden_size=64"], 1, "Drop shared_experts"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[moe_act]", "model.moe.num_experts=2"], 1,
     "set model.moe.grouped_gemm=true"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[moe_act]", "model.moe.num_experts=2",
      "model.moe.grouped_gemm=true"], 1, "falls back to the sequential experts here"),
    (["model=tiny_mod", "model.recompute.granularity=full", "train.precision=fp8"], 1,
     "a MoD layer cannot reuse its forward's top-k set"),
])
def test_impossible_recompute_settings_are_rejected(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        check(*overrides, world_size=world)
    assert needle in str(e.value), str(e.value)


def test_layernorm_recompute_needs_transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="layernorm, whose recompute in megatron-core 0.16.1 needs Transformer"):
            check("model.recompute.granularity=selective", "model.recompute.modules=[layernorm]")
    else:
        check("model.recompute.granularity=selective", "model.recompute.modules=[layernorm]")


def test_valid_recompute_settings_pass():
    check("model.recompute.granularity=full", "model.recompute.num_layers=2")
    check("model.recompute.granularity=full", "model.recompute.method=block", "model.recompute.num_layers=1",
          "parallel.pp=2", world_size=2)
    check("model.recompute.granularity=selective", "model.recompute.modules=[core_attn,mlp,moe]",
          "model.moe.num_experts=2", "model.moe.every=2")
