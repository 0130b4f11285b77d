"""Every supported layout trains the same model as one process: per-step loss and gradient norm
of the first 5 steps match the single-process reference.

All runs start from the SAME weights: each model is built once (TP1/PP1, seeded as mod-train
does), written with model_io.save_model and loaded by every layout through
``checkpoint.init_from`` (megatron's CPU init is TP-independent but not PP-independent). All
runs use the same global batch of 8 samples (micro-batch 2), so the number of data-parallel
ranks and micro-batches per step varies with the layout. Gradient clipping is set low enough
(0.5) that it acts at every step, so the global gradient norm each layout computes feeds into the
update. fp32 on CPU.

Tolerance: relative 1e-5 on loss and grad norm (measured: <= 1.1e-7 over all cases; DP, PP and
ZeRO layouts are usually bitwise equal, TP changes the summation order of the matmuls).

Three torchrun launches (world 1, 2, 4); each runs all its cases in one process group.
"""

import json
import math

import pytest

from mod_train.checkpoint.layout import read_metadata
from tests.helpers_train import losses, tiny_overrides, torchrun

RTOL = 1e-5
STEPS = 5

MODELS = {
    "dense": [],  # tiny_overrides: 2 layers, hidden 32, 4 heads, seq 32
    "l4": ["model.num_layers=4"],  # PP2 x vpp2 needs 4 layers
    "mod": ["model=tiny_mod", "model.num_layers=2", "model.hidden_size=32", "model.seq_length=32",
            "model.mod.capacity=0.25"],
    "tied": ["model.tie_embeddings=true"],
    "moe": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.every=2", "model.moe.offset=1"],
    "mod_l4": ["model=tiny_mod", "model.num_layers=4", "model.hidden_size=32", "model.seq_length=32",
               "model.mod.capacity=0.25"],  # MoD layers 1 and 3: one per virtual stage of PP2 x VPP2's rank 1
    # Packed documents: the MoD model (a dense and a MoD layer) with document masking, restarted
    # learned positions (rope ignores position ids) and no loss after EOD, through the real GPTDataset.
    "mod_docmask": ["model=tiny_mod", "model.num_layers=2", "model.hidden_size=32", "model.seq_length=32",
                    "model.mod.capacity=0.25", "model.position_embedding=learned_absolute",
                    "data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"],
}

# name: (world size, model, overrides, expected layout in complete.json)
CASES = {
    "dp2_zero0": (2, "dense", ["parallel.zero_stage=0"], {"dp": 2, "zero_stage": 0}),
    "dp2_zero1": (2, "dense", ["parallel.zero_stage=1"], {"dp": 2, "zero_stage": 1}),
    "dp2_zero2": (2, "dense", ["parallel.zero_stage=2"], {"dp": 2, "zero_stage": 2}),
    "dp2_zero3": (2, "dense", ["parallel.zero_stage=3"], {"dp": 2, "zero_stage": 3}),
    "tp2": (2, "dense", ["parallel.tp=2"], {"tp": 2, "dp": 1}),
    "tp2_sp": (2, "dense", ["parallel.tp=2", "parallel.sequence_parallel=true"], {"tp": 2, "sequence_parallel": True}),
    "pp2": (2, "dense", ["parallel.pp=2"], {"pp": 2, "dp": 1}),
    "pp2_vpp2": (2, "l4", ["parallel.pp=2", "parallel.vpp=2"], {"pp": 2, "vpp": 2}),
    "pp2_tied": (2, "tied", ["parallel.pp=2"], {"pp": 2}),
    "mod_tp2": (2, "mod", ["parallel.tp=2"], {"tp": 2}),
    "mod_tp2_sp": (2, "mod", ["parallel.tp=2", "parallel.sequence_parallel=true"], {"tp": 2, "sequence_parallel": True}),
    "mod_pp2": (2, "mod", ["parallel.pp=2"], {"pp": 2}),
    # The document mask gathered at the routed tokens, split over TP ranks (SP) / sent to both stages.
    "mod_docmask_tp2_sp": (2, "mod_docmask", ["parallel.tp=2", "parallel.sequence_parallel=true"],
                           {"tp": 2, "sequence_parallel": True}),
    "mod_docmask_pp2": (2, "mod_docmask", ["parallel.pp=2"], {"pp": 2}),
    "tp2_pp2": (4, "dense", ["parallel.tp=2", "parallel.pp=2"], {"tp": 2, "pp": 2, "dp": 1}),
    "dp2_tp2": (4, "dense", ["parallel.tp=2"], {"tp": 2, "dp": 2}),
    # MoE under TP needs SP (megatron); the alltoall dispatcher then moves uneven token counts
    # between TP ranks, the allgather dispatcher does not.
    "moe_tp2_sp": (2, "moe", ["parallel.tp=2", "parallel.sequence_parallel=true"], {"tp": 2, "ep": 1}),
    "moe_tp2_sp_ep2": (4, "moe", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"],
                       {"tp": 2, "ep": 2, "dp": 2}),
    "moe_tp2_sp_ep2_allgather": (4, "moe", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2",
                                            "model.moe.token_dispatcher=allgather"], {"tp": 2, "ep": 2}),
    # Expert tensor parallelism other than TP: DeepSpeed reduces expert gradients over megatron's
    # expert-data-parallel group, which then lies across TP and DP ranks. TP2 x ETP1 x EP2 on 2
    # ranks (whole experts, half per rank, dp 1); ETP2 > TP1 (experts split, dp 4, expert-dp 1);
    # TP2 x ETP1 x EP2 x expert-dp 2 with ZeRO-2 partitioning the experts over expert-dp.
    "moe_tp2_sp_etp1_ep2": (2, "moe", ["parallel=tp2_etp1_ep2", "parallel.micro_batch_size=2"],
                            {"tp": 2, "etp": 1, "ep": 2, "dp": 1}),
    "moe_etp2_ep2": (4, "moe", ["parallel.etp=2", "parallel.ep=2"], {"tp": 1, "etp": 2, "ep": 2, "dp": 4}),
    "moe_tp2_sp_etp1_ep2_zero2": (4, "moe", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.etp=1",
                                             "parallel.ep=2", "parallel.zero_stage=2"],
                                  {"tp": 2, "etp": 1, "ep": 2, "dp": 2, "zero_stage": 2}),
    # Activation recomputation (model.recompute) against the reference without it. Layer 0 of the
    # mod and moe models is dense, so every case also recomputes a dense layer. Full: the MoD layer
    # reuses its forward's top-k set in the recompute, under the TP broadcast, the interleaved
    # schedule (per model chunk, 4 micro-batches in flight) and ZeRO-3's re-gathered parameters.
    "mod_recompute_full_tp2_sp": (2, "mod", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                             "model.recompute.granularity=full", "model.recompute.num_layers=2"],
                                  {"tp": 2, "sequence_parallel": True}),
    "mod_recompute_full_pp2_vpp2": (2, "mod_l4", ["parallel.pp=2", "parallel.vpp=2", "model.recompute.granularity=full",
                                                  "model.recompute.method=block"], {"pp": 2, "vpp": 2}),
    "mod_recompute_full_dp2_zero3": (2, "mod", ["parallel.zero_stage=3", "model.recompute.granularity=full"],
                                     {"dp": 2, "zero_stage": 3}),
    "mod_recompute_selective_pp2": (2, "mod", ["parallel.pp=2", "model.recompute.granularity=selective",
                                               "model.recompute.modules=[core_attn,mlp]"], {"pp": 2}),
    "moe_recompute_full_tp2_sp": (2, "moe", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                             "model.recompute.granularity=full"], {"tp": 2, "ep": 1}),
    # The recomputed MoE layer repeats its expert-parallel all-to-all in backward.
    "moe_recompute_selective_tp2_sp_ep2": (4, "moe", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                      "parallel.ep=2", "model.recompute.granularity=selective",
                                                      "model.recompute.modules=[core_attn,mlp,moe]"],
                                           {"tp": 2, "ep": 2, "dp": 2}),
}


def _base(tiny_data):
    return tiny_overrides(tiny_data, "parallel.global_batch_size=8", f"train.max_steps={STEPS}",
                          "optim.clip_grad=0.5", "tracking.enabled=false", "checkpoint.save_interval=1000")


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("equivalence")
    base = _base(tiny_data)
    init = {m: out / f"init_{m}" for m in MODELS}
    launches = {1: [], 2: [], 4: []}
    for m, extra in MODELS.items():  # the reference and the shared initial weights: world of one
        launches[1].append({"kind": "init", "overrides": base + extra, "out": str(init[m])})
        launches[1].append({"kind": "train", "overrides": base + extra + [f"checkpoint.init_from={init[m]}"],
                            "run_dir": str(out / f"ref_{m}")})
    for name, (world, m, extra, _) in CASES.items():
        launches[world].append({"kind": "train", "run_dir": str(out / name),
                                "overrides": base + MODELS[m] + extra + [f"checkpoint.init_from={init[m]}"]})
    for world, jobs in launches.items():  # world 1 first: it writes the initial weights
        spec = out / f"spec_world{world}.json"
        spec.write_text(json.dumps({"jobs": jobs}))
        r = torchrun(world, ["-m", "tests.distributed.equivalence_driver", str(spec)], timeout=600)
        assert r.returncode == 0, f"world {world}:\n" + r.stdout[-3000:] + r.stderr[-5000:]
        (out / f"stdout_world{world}.txt").write_text(r.stdout)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(equivalence_runs, case):
    world, model, _, layout = CASES[case]
    run, ref = equivalence_runs / case, equivalence_runs / f"ref_{model}"
    recorded = read_metadata(run / "checkpoints" / f"iter_{STEPS:07d}")["layout"]
    assert recorded["world_size"] == world and {k: recorded[k] for k in layout} == layout, recorded

    got, want = losses(run), losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1)) and sorted(got) == sorted(want)
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=RTOL), (step, got[step], want[step])

    # DeepSpeed reports no global norm under ZeRO stage 0 (the loss check covers its clipping).
    got_norm, want_norm = losses(run, "grad norm"), losses(ref, "grad norm")
    assert sorted(want_norm) == list(range(1, STEPS + 1))
    if case != "dp2_zero0":
        assert sorted(got_norm) == sorted(want_norm)
    for step in got_norm:
        assert math.isclose(got_norm[step], want_norm[step], rel_tol=RTOL), (step, got_norm[step], want_norm[step])
    assert max(want_norm.values()) > 0.5  # clipping (optim.clip_grad=0.5) was active


@pytest.mark.slow
def test_mod_routing_stats_match(equivalence_runs):
    """MoD routing decisions (a discrete top-k) come out the same under TP, TP+SP and PP, and with
    activation recomputation."""
    key = "mod/layer2/causal_acc"
    want = losses(equivalence_runs / "ref_mod", key)
    assert sorted(want) == list(range(1, STEPS + 1))
    for case in ("mod_tp2", "mod_tp2_sp", "mod_pp2", "mod_recompute_full_tp2_sp", "mod_recompute_full_dp2_zero3",
                 "mod_recompute_selective_pp2"):
        got = losses(equivalence_runs / case, key)
        assert sorted(got) == sorted(want), case
        for step in want:
            assert math.isclose(got[step], want[step], rel_tol=RTOL, abs_tol=1e-6), (case, step)


@pytest.mark.slow
def test_etp_checkpoint_exports_to_the_single_process_weights(equivalence_runs, tmp_path):
    """The layout-free model/ written under TP2 x ETP1 x EP2 reads back (one process, TP1/EP1)
    as the weights of the single-process run at the same step: each rank's whole experts land
    under their global index (init_from already read a TP1 directory into that layout)."""
    import torch

    from mod_train.inference.export import export_checkpoint

    got, want = (torch.load(export_checkpoint(equivalence_runs / run / "checkpoints", tmp_path / f"{run}.pt"),
                            map_location="cpu", weights_only=False)
                 for run in ("moe_tp2_sp_etp1_ep2", "ref_moe"))
    assert got["step"] == want["step"] == STEPS and got["layout"]["etp"] == 1
    assert sorted(got["state_dict"]) == sorted(want["state_dict"])
    assert any(".experts." in k for k in want["state_dict"])
    for name, w in want["state_dict"].items():
        # 5 Adam steps on gradients that agree to ~1e-7 (TP sums in another order).
        torch.testing.assert_close(got["state_dict"][name], w, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_every_run_prints_its_fusion_decisions_once(equivalence_runs):
    """validate decides the fused kernels once (model/fusions.py); rank 0 of each run prints them in
    one line: all off on this CPU machine, each with its reason."""
    for world in (1, 2, 4):
        lines = [ln for ln in (equivalence_runs / f"stdout_world{world}.txt").read_text().splitlines()
                 if ln.startswith("fusions: ")]
        runs = sum(1 for _, (w, *_) in CASES.items() if w == world) + (len(MODELS) if world == 1 else 0)
        assert len(lines) == runs, (world, lines[:3])
        assert all(ln.startswith("fusions: bias_activation=off (no CUDA device), bias_dropout=off (no CUDA device)")
                   and "gradient_accumulation=off (DeepSpeed reduces gradients" in ln and "fp8=off" in ln
                   for ln in lines)
