"""Resharding: a checkpoint written under one layout resumes under another and training continues
as the uninterrupted run would, and ``mod-export`` turns any layout into the same weights.

Every run starts from the same initial weights (``checkpoint.init_from``), trains 10 steps with a
checkpoint at step 5, global batch 8. The resumed runs load ``iter_0000005/model`` (weights) and
``iter_0000005/optimizer`` (Adam moments) written by another layout, plus step, LR schedule
position and consumed samples from complete.json; their steps 6-10 are compared with the
uninterrupted single-process run. Tolerance: relative 1e-5 (the layouts themselves agree to ~1e-7,
see test_equivalence.py).

Without ``optimizer/`` (checkpoints of an older mod-train, or deleted) the Adam moments restart
from zero with a warning: then only the weaker property holds and is tested -- step 6's loss (computed
before the first update) and the LR schedule match exactly, later steps merely stay close.

Three torchrun launches: world 1 (initial weights, reference), world 2 (TP2 / PP2 / DP2-ZeRO-2
writers, TP1 -> TP2 reader), world 1 (the other readers, exports).
"""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from mod_train.checkpoint.layout import CheckpointDir, read_metadata
from tests.helpers_train import REPO, losses, tiny_overrides, torchrun

RTOL = 1e-5
STEPS, HALF = 10, 5

WRITERS = {  # name: (world size, overrides); each trains 10 steps, checkpoint at 5
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
}
# name: (world size, the run whose iter_5 it resumes, overrides of the reader's layout)
READERS = {
    "tp2_to_tp1": (1, "tp2", []),
    "pp2_to_pp1": (1, "pp2", []),
    "dp2_zero2_to_dp1_zero1": (1, "dp2_zero2", ["parallel.zero_stage=1"]),
    "tp1_to_tp2": (2, "ref", ["parallel.tp=2"]),
}


def _iter(run_dir, step=HALF):
    return run_dir / "checkpoints" / f"iter_{step:07d}"


@pytest.fixture(scope="module")
def reshard_runs(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("reshard")
    base = tiny_overrides(tiny_data, "parallel.global_batch_size=8", f"train.max_steps={STEPS}",
                          f"checkpoint.save_interval={HALF}", "checkpoint.keep_last=1000", "tracking.enabled=false")
    init = out / "init"
    fresh = base + [f"checkpoint.init_from={init}"]

    def train(name, extra, resume=None):
        job = {"kind": "train", "run_dir": str(out / name), "overrides": fresh + extra}
        if resume is not None:
            job["overrides"] = job["overrides"] + [f"checkpoint.resume={resume}"]
        return job

    def launch(world, jobs, tag):
        spec = out / f"spec_{tag}.json"
        spec.write_text(json.dumps({"jobs": jobs}))
        r = torchrun(world, ["-m", "tests.distributed.equivalence_driver", str(spec)], timeout=600)
        (out / f"stdout_{tag}.txt").write_text(r.stdout)
        assert r.returncode == 0, f"{tag}:\n" + r.stdout[-3000:] + r.stderr[-5000:]

    launch(1, [{"kind": "init", "overrides": base, "out": str(init)}, train("ref", [])], "first")
    jobs = [train(name, extra) for name, (world, extra) in WRITERS.items() if world == 2]
    jobs += [train(name, extra, _iter(out / src)) for name, (world, src, extra) in READERS.items() if world == 2]
    launch(2, jobs, "world2")

    # The TP2 checkpoint as an older mod-train (or a user deleting it) would leave it: no optimizer/.
    bare = out / "bare_ckpt" / _iter(out / "tp2").name
    shutil.copytree(_iter(out / "tp2"), bare, ignore=shutil.ignore_patterns("optimizer"))
    # An older mod-train also wrote no checksums (a current checkpoint missing optimizer/ is damaged).
    record = read_metadata(bare)
    record.pop("files"), record.pop("checksum_algorithm")
    (bare / "complete.json").write_text(json.dumps(record))
    jobs = [train(name, extra, _iter(out / src)) for name, (world, src, extra) in READERS.items() if world == 1]
    jobs.append(train("bare_to_tp1", [], bare))
    jobs += [{"kind": "export", "checkpoint": str(_iter(out / run)), "out": str(out / f"export_{run}.pt")}
             for run in ("ref", "pp2")]
    launch(1, jobs, "world1")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("reader", list(READERS))
def test_resharded_resume_continues_like_the_uninterrupted_run(reshard_runs, reader):
    world, src, _ = READERS[reader]
    run, ref = reshard_runs / reader, reshard_runs / "ref"
    written, now = read_metadata(_iter(reshard_runs / src))["layout"], read_metadata(_iter(run, STEPS))["layout"]
    assert written != now and now["world_size"] == world  # really another layout

    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(HALF + 1, STEPS + 1))  # continued at step 6, not from scratch
    for step in got:
        assert math.isclose(got[step], want[step], rel_tol=RTOL), (step, got[step], want[step])
    for key in ("learning rate", "consumed samples"):
        assert losses(run, key) == {s: v for s, v in losses(ref, key).items() if s > HALF}, key
    got_norm, want_norm = losses(run, "grad norm"), losses(ref, "grad norm")
    for step in got_norm:
        assert math.isclose(got_norm[step], want_norm[step], rel_tol=RTOL), (step, got_norm[step], want_norm[step])
    log = (reshard_runs / f"stdout_world{world}.txt").read_text()
    assert f"resumed from {_iter(reshard_runs / src)} at step {HALF}, resharded from layout" in log


@pytest.mark.slow
def test_reshard_without_optimizer_state_restarts_the_moments(reshard_runs):
    """Weaker property: weights, step, LR schedule and data position are restored, moments are not."""
    run, ref = reshard_runs / "bare_to_tp1", reshard_runs / "ref"
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(HALF + 1, STEPS + 1))
    # Step 6's loss is computed before the first update: only the weights and the data matter.
    assert math.isclose(got[HALF + 1], want[HALF + 1], rel_tol=RTOL)
    assert losses(run, "learning rate") == {s: v for s, v in losses(ref, "learning rate").items() if s > HALF}
    # Later steps differ (fresh Adam moments: larger first updates) but stay close to the reference.
    later = [abs(got[s] - want[s]) / want[s] for s in range(HALF + 2, STEPS + 1)]
    assert max(later) > RTOL and max(later) < 0.05, later
    assert "resharding restarts the Adam moments from zero" in (reshard_runs / "stdout_world1.txt").read_text()


def _export_cli(checkpoint, out):
    r = subprocess.run([sys.executable, "-m", "mod_train.export", "--checkpoint", str(checkpoint), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return torch.load(out, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_export_of_a_tp2_checkpoint_matches_its_tp1_twin(reshard_runs, tmp_path):
    """``mod-export`` (one process) on the TP2 checkpoint gives the weights of the TP1 run at the same step."""
    tp2 = _export_cli(reshard_runs / "tp2" / "checkpoints", tmp_path / "tp2.pt")  # a root: its latest, step 10
    assert tp2["step"] == STEPS and tp2["layout"]["tp"] == 2
    tp2 = _export_cli(_iter(reshard_runs / "tp2"), tmp_path / "tp2_5.pt")
    twin = torch.load(reshard_runs / "export_ref.pt", map_location="cpu", weights_only=False)
    assert tp2["step"] == twin["step"] == HALF and tp2["config"]["parallel"]["tp"] == 2
    assert sorted(tp2["state_dict"]) == sorted(twin["state_dict"])
    for name, want in twin["state_dict"].items():
        got = tp2["state_dict"][name]
        assert got.shape == want.shape, name
        # 5 Adam steps on gradients that agree to ~1e-7 (TP sums in another order).
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    # The file loads into a TP1/PP1 model as is: names are GPTModel's, every parameter is there.
    assert any(k.startswith("decoder.layers.1.") for k in twin["state_dict"])
    assert "embedding.word_embeddings.weight" in twin["state_dict"] and "output_layer.weight" in twin["state_dict"]


@pytest.mark.slow
def test_export_of_a_pp2_checkpoint_is_bitwise_its_tp1_twin(reshard_runs):
    """PP2 trains bitwise like one process on CPU fp32, so its export equals the TP1 export exactly."""
    pp2 = torch.load(reshard_runs / "export_pp2.pt", map_location="cpu", weights_only=False)
    twin = torch.load(reshard_runs / "export_ref.pt", map_location="cpu", weights_only=False)
    assert sorted(pp2["state_dict"]) == sorted(twin["state_dict"])
    for name, want in twin["state_dict"].items():
        assert torch.equal(pp2["state_dict"][name], want), name
    assert CheckpointDir(reshard_runs / "pp2" / "checkpoints").find_latest()[0] == STEPS
