"""One routing decision per tensor-parallel group (issue 13, point 5), 2 gloo processes, TP=2.

The router weight of one TP rank is perturbed by one ulp so that two tokens whose logits tie
exactly on the other rank are ordered the other way: each rank alone would route a different
token. The layer must still route the same tokens on both ranks (the first TP rank's selection),
with and without sequence parallelism, for top-k and for the causal decision. With sequence
parallelism a k that does not divide by TP (a shorter sequence) is padded, not refused.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_distributed

pytestmark = pytest.mark.slow

S, B, H = 16, 1, 32
TIE_A, TIE_B = 3, 11  # the two tokens whose router logits tie exactly


def _layer(sequence_parallel: bool, capacity: float):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mod_train.compat import apply_cpu_patches
    from mod_train.config.load import compose, to_config
    from mod_train.config.schema import ModConfig
    from mod_train.config.validate import validate
    from mod_train.model.build import transformer_config
    from mod_train.model.mod import MoDTransformerLayer
    from mod_train.model.specs import base_layer_spec

    apply_cpu_patches()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = to_config(compose(["model.vocab_size=128", f"model.hidden_size={H}", "model.num_attention_heads=4",
                             f"model.seq_length={S}", "model.num_layers=2", "parallel.tp=2",
                             f"parallel.sequence_parallel={str(sequence_parallel).lower()}"]))
    d = validate(cfg, world_size=2, check_files=False, has_cuda=False)
    spec = base_layer_spec(cfg.model, moe=False)
    layer = MoDTransformerLayer(config=transformer_config(cfg, d), submodules=spec.submodules, layer_number=1,
                                capacity=capacity, mod=ModConfig(enabled=True), seq_length=S)
    layer.eval()
    return layer


def _tied_input(rank: int, layer, length: int):
    """Logits: distinct for every token except TIE_A and TIE_B, which tie at the top-k boundary on
    rank 0; rank 1's weight is one ulp larger on the feature of the token rank 0 did not pick."""
    import torch

    from mod_train.model.flops import routed_tokens
    from mod_train.model.mod import topk_indices

    torch.manual_seed(5)
    x = torch.zeros(length, B, H)
    x[:, :, 2:] = torch.randn(length, B, H - 2)
    k = routed_tokens(layer.capacity, length)
    # Feature 0 carries the score: k - 1 clear winners, then the tie, then clear losers.
    scores = torch.linspace(-4.0, -1.0, length)
    winners = [i for i in range(length) if i not in (TIE_A, TIE_B)][: k - 1]
    for n, i in enumerate(winners):
        scores[i] = 10.0 + n
    x[:, 0, 0] = scores
    x[TIE_A, 0, 0], x[TIE_B, 0, 0] = 5.0, 0.0  # TIE_A scores 5 * w0, TIE_B 5 * w1: with w0 == w1 a tie
    x[TIE_B, 0, 1] = 5.0
    with torch.no_grad():
        w = layer.router.linear.weight
        w.zero_()
        w[0, 0] = w[0, 1] = 1.0
        logits = layer.router.scores(x)
        picked = set(topk_indices(logits, k)[0].tolist())
        assert (TIE_A in picked) != (TIE_B in picked)
        if rank == 1:  # one ulp towards the token rank 0 left out
            col = 1 if TIE_A in picked else 0
            w[0, col] = torch.nextafter(w[0, col], torch.tensor(2.0))
    return x


def _routed_rows(rank, layer, x, causal: bool = False):
    """Which tokens the layer changed, from the full output (gathered under sequence parallel)."""
    import contextlib

    import torch
    import torch.distributed as dist

    from mod_train.model.mod import causal_routing

    sp = layer.config.sequence_parallel
    inp = x.chunk(2, dim=0)[rank].contiguous() if sp else x
    with torch.no_grad(), (causal_routing([layer]) if causal else contextlib.nullcontext()):
        out, _ = layer(inp, attention_mask=None)
    if sp:
        parts = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(parts, out.contiguous())
        out = torch.cat(parts)
    return (out != x).any(-1)[:, 0].nonzero().squeeze(-1).tolist()


def _scenarios(rank: int, world_size: int):
    results = {}
    for sp in (False, True):
        layer = _layer(sp, capacity=0.25)
        x = _tied_input(rank, layer, S)
        results[f"topk sp={sp}"] = _routed_rows(rank, layer, x)
        w = layer.router.linear.weight
        results[f"weights differ sp={sp}"] = float(w[0, 0]) != float(w[0, 1])
        # Causal decision with the threshold exactly at the tied logit (5.0): only the token whose
        # weight got the extra ulp clears it, on rank 1 alone; the group must still agree.
        layer.router.causal_threshold.fill_(5.0)
        results[f"causal sp={sp}"] = _routed_rows(rank, layer, x, causal=True)
    # Sequence parallel at a shorter length: k = round(0.25 * 12) = 3 does not divide by TP=2.
    layer = _layer(True, capacity=0.25)
    results["topk sp short"] = _routed_rows(rank, layer, _tied_input(rank, layer, 12))
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_scenarios, 2, timeout_s=150)


@pytest.mark.parametrize("case", ["topk sp=False", "topk sp=True", "topk sp short", "causal sp=False",
                                  "causal sp=True"])
def test_tp_ranks_route_the_same_tokens(results, case):
    r0, r1 = results
    assert r0[case] == r1[case], f"{case}: rank 0 routed {r0[case]}, rank 1 routed {r1[case]}"


def test_the_perturbation_is_real(results):
    # Rank 1's weight differs by one ulp: alone, it would have picked the other tied token.
    assert results[1]["weights differ sp=False"] and not results[0]["weights differ sp=False"]


def test_sequence_parallel_routes_k_tokens_at_a_length_k_does_not_divide(results):
    assert len(results[0]["topk sp short"]) == 3
    assert len(results[0]["topk sp=True"]) == 4
