"""Expert parallelism under DeepSpeed ZeRO and the MoDE variants, on 2 ranks (one torchrun launch).

* The EP=2 model is the EP=1 model: identical initial weights (experts by global index), and the
  same per-step loss and grad norm for 5 steps (fp32, dropless) with both token dispatchers, and
  for integrated MoDE and aux-loss-free balancing (expert bias). Tolerance: rel 1e-6 on the loss and rel 1e-5 on the grad norm (on CPU the
  losses come out bit-identical; only the order of a few reductions differs between layouts).
* EP=2 with ZeRO-1 and ZeRO-2, TP2 x ETP1 x EP2 (expert tensor parallelism 1), and staged /
  integrated MoDE and expert bias (EP=2, ZeRO-1): 20 steps straight == 10 steps, stop, resume, 10
  steps, bitwise (the expert bias resumes with the model);
  the MoDE skip / no-op shares are in metrics.jsonl; the routing heatmap is logged as an MLflow
  artifact at checkpoints.
"""

import json
import math

import pytest
import torch

from tests.helpers_train import losses, tiny_overrides, torchrun

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.every=2", "model.moe.offset=1"]
SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.seq_length=32"]  # as tiny_overrides
SHORT = ["train.max_steps=5", "checkpoint.save_interval=1000", "tracking.enabled=false"]
NO_TRACKING = ["tracking.enabled=false"]
# Aux-loss-free balancing; a rate large enough that the bias changes the routing within 5 steps.
EXPERT_BIAS = ["model.moe.load_balancing=expert_bias", "model.moe.bias_update_rate=0.01"]

EQUIVALENCE = {  # name -> overrides; each runs with parallel.ep=1 and parallel.ep=2
    "alltoall": [*MOE, "model.moe.token_dispatcher=alltoall"],
    "allgather": [*MOE, "model.moe.token_dispatcher=allgather"],
    "integrated": ["model=tiny_mode_integrated", *SMALL],
    "expert_bias": [*MOE, *EXPERT_BIAS],
}
RESUME = {
    "ep2_zero1": [*MOE, "parallel.ep=2", "parallel.zero_stage=1", *NO_TRACKING],
    "ep2_zero2": [*MOE, "parallel.ep=2", "parallel.zero_stage=2", *NO_TRACKING],
    "staged": ["model=tiny_mode_staged", *SMALL, "model.mod.capacity=0.25", "parallel.ep=2", *NO_TRACKING],
    "integrated": ["model=tiny_mode_integrated", *SMALL, "parallel.ep=2"],
    "expert_bias": [*MOE, *EXPERT_BIAS, "parallel.ep=2", *NO_TRACKING],
    # Expert tensor parallelism 1 under TP2: whole experts, half per rank (parallel=tp2_etp1_ep2).
    "tp2_etp1_ep2": [*MOE, "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.etp=1", "parallel.ep=2",
                     *NO_TRACKING],
}


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("moe")
    cases = [{"kind": "weights", "name": f"weights_ep{ep}", "overrides": tiny_overrides(tiny_data, *MOE, f"parallel.ep={ep}")}
             for ep in (1, 2)]
    cases += [{"kind": "train", "name": f"{name}_ep{ep}", "overrides": tiny_overrides(tiny_data, *extra, f"parallel.ep={ep}", *SHORT)}
              for name, extra in EQUIVALENCE.items() for ep in (1, 2)]
    cases += [{"kind": "resume", "name": f"resume_{name}", "stop_after": 10, "overrides": tiny_overrides(tiny_data, *extra)}
              for name, extra in RESUME.items()]
    (out / "spec.json").write_text(json.dumps({"out": str(out), "cases": cases}))
    r = torchrun(2, ["-m", "tests.distributed.moe_driver", str(out / "spec.json")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out


@pytest.mark.slow
def test_ep2_model_has_the_ep1_weights(moe_runs):
    ep1, ep2 = (torch.load(moe_runs / f"weights_ep{ep}" / "weights.pt") for ep in (1, 2))
    assert sorted(ep1) == sorted(ep2)
    assert [k for k in ep1 if not torch.equal(ep1[k], ep2[k])] == []
    experts = [ep1[k] for k in sorted(ep1) if ".local_experts." in k and "linear_fc1" in k]
    assert len(experts) == 4
    assert all(not torch.equal(experts[0], e) for e in experts[1:])  # experts differ from each other


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_ep2_trains_like_ep1(moe_runs, name):
    for key, rel in (("lm loss", 1e-6), ("grad norm", 1e-5)):
        ep1, ep2 = (losses(moe_runs / f"{name}_ep{ep}", key) for ep in (1, 2))
        assert sorted(ep1) == sorted(ep2) == [1, 2, 3, 4, 5]
        for step in ep1:
            assert math.isclose(ep1[step], ep2[step], rel_tol=rel), (key, step, ep1[step], ep2[step])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUME))
def test_ep2_and_mode_resume_bitwise(moe_runs, name):
    straight, resumed = moe_runs / f"resume_{name}" / "straight", moe_runs / f"resume_{name}" / "resumed"
    assert sorted(losses(straight)) == list(range(1, 21))
    assert losses(resumed) == losses(straight)
    assert (resumed / "checkpoints" / "iter_0000010").is_dir()
    keys = ["moe/layer2/load_e0", "moe/layer2/z_loss"]
    keys += ["moe/layer2/expert_bias_max_abs"] if name == "expert_bias" else ["moe/layer2/aux_loss"]
    if name == "staged":
        keys += ["moe/layer2/skip_frac", "mod/layer2/causal_acc"]
    if name == "integrated":
        keys += ["moe/layer2/noop_frac"]
    for key in keys:
        values = losses(straight, key)
        assert len(values) == 20, key
        assert losses(resumed, key) == values, key
    if name == "expert_bias":  # each applied step moves every bias by +-rate: |bias| <= (step - 1) x rate
        bias = losses(straight, "moe/layer2/expert_bias_max_abs")
        assert bias[1] == 0.0 and 0.0 < bias[20] <= 19 * 0.01 + 1e-6, bias
        assert losses(straight, "moe/layer2/aux_loss") == {}  # load_balancing=expert_bias: no aux loss
    if name == "staged":  # MoD capacity 0.25: 3/4 of the tokens skip the block (and its MoE)
        assert set(losses(straight, "moe/layer2/skip_frac").values()) == {0.75}
    if name == "integrated":
        noop = losses(straight, "moe/layer2/noop_frac")
        assert all(0.0 < v < 1.0 for v in noop.values())
        # the routing heatmap (layers x experts + no-op) is an MLflow artifact at every checkpoint
        pngs = sorted(p.name for p in (straight / "mlartifacts").rglob("routing_iter_*.png"))
        assert pngs == [f"routing_iter_{s:07d}.png" for s in (5, 10, 15, 20)]


@pytest.mark.slow
def test_mode_checkpoints_written_with_ep2_generate_text(moe_runs):
    """mod-generate (one process) samples from EP=2 MoE/MoDE checkpoints: the experts of both EP
    ranks come back from the layout-free model/ directory; sampling with a seed is reproducible.
    (Greedy decoding of these 20-step models mostly emits the end-of-document token at once.)"""
    import subprocess
    import sys

    from tests.helpers_train import REPO

    for name in ("ep2_zero2", "staged", "integrated"):
        ckpt = moe_runs / f"resume_{name}" / "straight" / "checkpoints"
        cmd = [sys.executable, "-m", "mod_train.generate", "--checkpoint", str(ckpt), "--seed", "1",
               "--max-new-tokens", "12", "--prompt", "def"]
        runs = [subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300) for _ in range(2)]
        for r in runs:
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        text = runs[0].stdout.strip().splitlines()[-1]
        assert text.startswith("def") and len(text) > len("def"), text
        assert runs[1].stdout == runs[0].stdout


@pytest.mark.slow
def test_expert_bias_of_an_ep2_checkpoint_loads_into_one_process(moe_runs, tmp_path):
    """The expert bias travels with the layout-free model/ copy: mod-export (one process, EP1) of the
    EP2 run's step-10 checkpoint holds the bias that step 11 routed with (its logged max |bias|)."""
    import subprocess
    import sys

    from mod_train.inference.export import load_export
    from tests.helpers_train import REPO

    resumed = moe_runs / "resume_expert_bias" / "resumed"
    out = tmp_path / "expert_bias.pt"
    r = subprocess.run([sys.executable, "-m", "mod_train.export", "--checkpoint", str(resumed / "checkpoints"),
                        "--iter", "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    bias = load_export(out)["state_dict"]["decoder.layers.1.mlp.router.expert_bias"]
    assert bias.shape == (4,)
    logged = losses(resumed, "moe/layer2/expert_bias_max_abs")[11]
    assert logged > 0 and float(bias.abs().max()) == logged
