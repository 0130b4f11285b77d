"""Exact resume: 20 steps straight == 10 steps, stop, resume, 10 steps (bitwise on CPU fp32),
for ZeRO stages 1, 2, 3 (also with checkpoint.async_save) and for the MoD model. The checkpoints hold
one copy of the state (model/ + optimizer/ + rng/, no DeepSpeed files): that copy alone resumes
bitwise. One torchrun launch (2 ranks) runs every case."""

import json

import pytest

from tests.helpers_train import losses, tiny_overrides, torchrun

CASES = {
    "zero1": ["parallel.zero_stage=1"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
    # The checkpoints of step 5/10/15 are written in the background (forked while ZeRO-3's weights are
    # gathered) and committed a step later; the resume reads the one of step 10.
    "zero3_async": ["parallel.zero_stage=3", "checkpoint.async_save=true"],
    "mod_zero1": ["model=tiny_mod", "model.num_layers=2", "model.hidden_size=32", "model.seq_length=32",
                  "model.mod.capacity=0.25", "parallel.zero_stage=1", "train.eval_interval=10", "train.eval_iters=1"],
    # Upcycling's capacity schedule (1.0 -> 0.25 in 4 phases over 16 steps) continues across the stop.
    "mod_schedule": ["model=tiny_mod", "model.num_layers=2", "model.hidden_size=32", "model.seq_length=32",
                     "model.mod.capacity=0.25", "parallel.zero_stage=1", "train.eval_interval=10",
                     "train.eval_iters=1", "model.mod.capacity_schedule.steps=16",
                     "model.mod.capacity_schedule.phases=4"],
}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("resume")
    spec = {"out": str(out), "cases": [
        {"name": name, "overrides": tiny_overrides(tiny_data, *extra)} for name, extra in CASES.items()]}
    (out / "spec.json").write_text(json.dumps(spec))
    r = torchrun(2, ["-m", "tests.distributed.resume_driver", str(out / "spec.json")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bitwise_exact(resume_runs, case):
    straight = losses(resume_runs / case / "straight")
    resumed = losses(resume_runs / case / "resumed")
    assert sorted(straight) == list(range(1, 21))
    assert resumed == straight  # every step, bit for bit
    # the resumed run really stopped and restarted: its checkpoints include the stop point
    assert (resumed_dir := resume_runs / case / "resumed" / "checkpoints" / "iter_0000010").is_dir(), resumed_dir
    if case.startswith("mod"):
        # Per-layer MoD routing stats are logged and resume exactly too, the calibrated causal
        # threshold (a buffer saved with the weights) included.
        for key in ("mod/layer2/causal_acc", "mod/layer2/causal_threshold"):
            assert len(losses(resume_runs / case / "straight", key)) == 20
            assert losses(resume_runs / case / "resumed", key) == losses(resume_runs / case / "straight", key)
        assert losses(resume_runs / case / "straight", "mod/layer2/causal_threshold")[20] != 0.0
        # Validation of a MoD model reports the top-k loss (as trained) and the causal loss (the
        # model that samples); both are the same after a resume.
        for key in ("valid lm loss", "valid lm loss (causal)"):
            assert sorted(losses(resume_runs / case / "straight", key)) == [10, 20]
            assert losses(resume_runs / case / "resumed", key) == losses(resume_runs / case / "straight", key)
