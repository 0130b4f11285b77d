"""Resilience on 2 ranks (CPU, gloo, ZeRO 1, fp32):

- a NaN loss injected on rank 0 only at step 4 skips that update on both ranks: the run ends with
  weights, optimizer state and LR schedule bitwise equal to a run that skipped step 4's update on
  purpose (same batches, finite loss) and different from a run that applied it;
- a loss spike at step 7 rolls back to the checkpoint of step 5 and continues past the data of
  steps 6-7;
- a rank that hangs at step 5 is stopped by the watchdog (stack dump, non-zero exit) and the job
  resumes from its checkpoint of step 3.

One torchrun launch for the first three runs, two for the watchdog (the hang and the resume)."""

import json
import math

import pytest
import torch

from tests.helpers_train import losses, tiny_overrides, torchrun

STEPS = 10
NAN_STEP = 4
SPIKE_STEP = 7

# final_state() compares DeepSpeed's files (each rank's ZeRO partition): written on request.
DS_FILES = "checkpoint.deepspeed_files=true"
CASES = {
    "applied": [DS_FILES],
    "nan": [f"train.inject.nan_loss_at_step={NAN_STEP}", "train.inject.ranks=[0]", DS_FILES],
    "skipped": [f"train.inject.skip_update_at_step={NAN_STEP}", DS_FILES],
    "spike": ["train.spike.action=rollback", "train.spike.window=3", "train.spike.threshold_sigmas=10",
              f"train.inject.spike_loss_at_step={SPIKE_STEP}", "train.inject.spike_factor=100"],
}


def base(tiny_data, *extra):
    return tiny_overrides(tiny_data, f"train.max_steps={STEPS}", "optim.warmup_steps=8", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("resilience")
    spec = {"out": str(out), "cases": [{"name": n, "overrides": base(tiny_data, *e)} for n, e in CASES.items()]}
    (out / "spec.json").write_text(json.dumps(spec))
    r = torchrun(2, ["-m", "tests.distributed.resilience_driver", str(out / "spec.json")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, r.stdout


def final_state(run_dir):
    """DeepSpeed's files of the last checkpoint: model weights + LR schedule, and each rank's ZeRO
    partition (fp32 master weights, Adam moments)."""
    state = run_dir / "checkpoints" / f"iter_{STEPS:07d}" / "state"
    model = torch.load(state / "mp_rank_00_model_states.pt", weights_only=False)
    optim = [torch.load(state / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False) for r in (0, 1)]
    return {"module": model["module"], "lr_scheduler": model["lr_scheduler"],
            "optim": [o["optimizer_state_dict"] for o in optim]}


def differences(a, b, path="") -> list:
    """Where two nested states differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [path + " (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:
        return differences(vars(a), vars(b), path)  # e.g. DeepSpeed's loss scaler object
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_nan_step_is_skipped_on_every_rank(runs):
    out, _ = runs
    nan, skipped, applied = (losses(out / n) for n in ("nan", "skipped", "applied"))
    assert math.isnan(nan[NAN_STEP]) and not math.isnan(skipped[NAN_STEP])
    # Before the fault all three runs are the same; after it the NaN run is the skipped run, bit
    # for bit, and not the run that applied step 4's update.
    assert {s: nan[s] for s in range(1, NAN_STEP)} == {s: applied[s] for s in range(1, NAN_STEP)}
    assert {s: nan[s] for s in range(NAN_STEP + 1, STEPS + 1)} == \
           {s: skipped[s] for s in range(NAN_STEP + 1, STEPS + 1)}
    assert nan[STEPS] != applied[STEPS]
    assert differences(final_state(out / "nan"), final_state(out / "skipped")) == []
    assert differences(final_state(out / "nan")["module"], final_state(out / "applied")["module"])
    # the LR schedule did not move at the skipped step (warmup: it moves every applied step)
    lr, lr_applied = losses(out / "nan", "learning rate"), losses(out / "applied", "learning rate")
    assert lr[NAN_STEP + 1] == lr[NAN_STEP] == lr_applied[NAN_STEP] != lr_applied[NAN_STEP + 1]
    assert losses(out / "nan", "skipped iterations")[STEPS] == 1
    assert losses(out / "nan", "nan iterations")[STEPS] == 1
    assert losses(out / "skipped", "nan iterations")[STEPS] == 0
    assert losses(out / "applied", "skipped iterations")[STEPS] == 0


@pytest.mark.slow
def test_spike_rolls_back_and_continues(runs):
    out, stdout = runs
    assert "loss spike at step 7: rollback: loss spike" in stdout
    assert "rolled back to the checkpoint of step 5; the data of the 2 steps since is skipped" in stdout
    spike = out / "spike"
    assert sorted(losses(spike)) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses(spike).values())
    assert losses(spike, "rollbacks")[STEPS] == 1 and losses(spike, "loss spikes")[STEPS] == 1
    # 12 steps of data for 10 steps: the two of the spike window were skipped (4 samples a step)
    assert losses(spike, "consumed samples")[STEPS] == (STEPS + 2) * 4
    # up to the checkpoint the run is the plain one; after the rollback it trains on other data
    applied = losses(out / "applied")
    assert {s: losses(spike)[s] for s in range(1, 6)} == {s: applied[s] for s in range(1, 6)}
    assert losses(spike)[6] != applied[6]
    # the LR schedule went back with the checkpoint
    assert losses(spike, "learning rate")[6] == losses(out / "applied", "learning rate")[6]


@pytest.mark.slow
def test_watchdog_stops_a_hung_rank_and_the_job_resumes(tmp_path, tiny_data):
    run_dir = tmp_path / "hang"
    common = base(tiny_data, f"train.run_dir={run_dir}", f"tracking.tracking_uri=sqlite:///{run_dir}/mlflow.db",
                  "checkpoint.save_interval=3", "train.step_timeout_s=20")
    hung = torchrun(2, ["-m", "mod_train.train", *common, "train.inject.hang_at_step=5", "train.inject.ranks=[1]"],
                    timeout=300)
    assert hung.returncode != 0, hung.stdout[-2000:]
    dump = (run_dir / "watchdog" / "rank_00001.txt").read_text()
    assert "rank 1: step 5 ran past train.step_timeout_s=20 s" in dump
    assert "in before_step" in dump and "in fit" in dump  # the hung frame and the loop around it
    assert "stacks in" in hung.stderr and "exiting with code 86" in hung.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    resumed = torchrun(2, ["-m", "mod_train.train", *common], timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "at step 3" in resumed.stdout and "resumed from" in resumed.stdout
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
