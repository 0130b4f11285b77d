"""Self-verifying checkpoints: every kind of checkpoint file, overwritten (4 KiB) or truncated, is
found before anything is loaded; resume falls back to the newest good checkpoint, the damaged one
is marked bad and kept, the good one is never pruned; ``mod-ckpt verify`` says the same offline.

The checkpoints are real (one rank, DeepSpeed ZeRO-1 + the layout-free model/ and optimizer/),
written once by a module fixture; the verification logic is then exercised in-process on copies.
One end-to-end resume shows the trainer falls back and trains finite losses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mod_train.checkpoint import integrity
from mod_train.checkpoint.layout import CheckpointDir

REPO = Path(__file__).resolve().parents[2]
# checkpoint.deepspeed_files: the second copy too, so damage to each kind of file is covered.
ARGS = ["data=mock", "model.vocab_size=256", "tracking.enabled=false", "parallel.zero_stage=1",
        "checkpoint.save_interval=2", "checkpoint.keep_last=3", "checkpoint.deepspeed_files=true"]
# Every kind of file a checkpoint holds (complete.json is tested on its own: it cannot list itself).
FILES = [
    "state/mp_rank_00_model_states.pt",  # DeepSpeed model states
    "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",  # DeepSpeed ZeRO optimizer partition
    "model/__0_0.distcp",  # layout-free weights
    "model/.metadata",
    "optimizer/__0_0.distcp",  # layout-free Adam moments
    "rng/rank_00000.pt",
]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    from mod_train.distributed.world import free_port

    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("MOD_TRAIN_RUN_LOCK", None)
    return subprocess.run([sys.executable, "-m", "mod_train.train", *ARGS, f"train.run_dir={run_dir}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A run directory with real checkpoints at steps 2 and 4 (latest: 4)."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    r = _train(run_dir, "train.max_steps=4")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return run_dir


def _copy(written: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(written, run_dir)
    return run_dir


def _overwrite(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - 2048))
        f.write(os.urandom(min(4096, size)))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {"overwrite_4KiB": _overwrite, "truncate": _truncate}


def test_a_checkpoint_lists_every_file_with_size_and_checksum(written):
    ck = written / "checkpoints" / "iter_0000004"
    record = json.loads((ck / "complete.json").read_text())
    listed = record[integrity.FILES_KEY]
    on_disk = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()} - {"complete.json"}
    assert set(listed) == on_disk and set(FILES) <= on_disk
    for rel, entry in listed.items():
        assert entry["size"] == (ck / rel).stat().st_size
        assert entry["checksum"] == integrity.file_checksum(ck / rel, record[integrity.ALGORITHM_KEY])
    assert integrity.verify(ck, record).status is integrity.Status.GOOD


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_each_damaged_file_is_named_marked_bad_and_resume_falls_back_to_the_good_one(written, tmp_path, how, caplog):
    from mod_train.checkpoint.state import Checkpointer
    from mod_train.ckpt import main as mod_ckpt

    for rel in FILES:
        run_dir = _copy(written, tmp_path / rel.replace("/", "_"))
        root = run_dir / "checkpoints"
        damaged = root / "iter_0000004"
        DAMAGE[how](damaged / rel)
        # Offline first: read-only, names the file, exit 1.
        assert mod_ckpt(["verify", str(root)]) == 1
        assert not (damaged / integrity.BAD_MARKER).exists()
        # Resume: every rank gets the good checkpoint; the damaged one is marked and kept.
        caplog.clear()
        assert Checkpointer(root, keep_last=1, rank=0).resolve("auto") == root / "iter_0000002", rel
        assert str(damaged / rel) in caplog.text, (rel, caplog.text)
        assert str(damaged / rel) in integrity.bad_reason(damaged)
        assert (damaged / rel).exists()
        # Never pruned: neither the good one (the only usable one) nor the bad one (evidence).
        CheckpointDir(root).prune(1)
        assert (root / "iter_0000002").is_dir() and damaged.is_dir()
        # Asked for by name, it is refused naming the file.
        with pytest.raises(ValueError, match=rel.replace(".", r"\.")):
            Checkpointer(root, keep_last=1, rank=0).resolve(str(damaged))


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_complete_json_falls_back_and_is_never_pruned(written, tmp_path, how, capsys):
    from mod_train.checkpoint.state import Checkpointer
    from mod_train.ckpt import main as mod_ckpt

    root = _copy(written, tmp_path) / "checkpoints"
    DAMAGE[how](root / "iter_0000004" / "complete.json")
    assert Checkpointer(root, keep_last=1, rank=0).resolve("auto") == root / "iter_0000002"
    CheckpointDir(root).prune(1)
    assert (root / "iter_0000002").is_dir() and (root / "iter_0000004").is_dir()
    assert mod_ckpt(["verify", str(root / "iter_0000004")]) == 1
    assert "iter_0000004/complete.json" in capsys.readouterr().out


def test_a_checkpoint_without_checksums_still_loads_unverified(written, tmp_path, caplog, capsys):
    from mod_train.checkpoint.state import Checkpointer
    from mod_train.ckpt import main as mod_ckpt

    root = _copy(written, tmp_path) / "checkpoints"
    marker = root / "iter_0000004" / "complete.json"
    record = json.loads(marker.read_text())
    del record[integrity.FILES_KEY], record[integrity.ALGORITHM_KEY]
    marker.write_text(json.dumps(record))
    assert Checkpointer(root, keep_last=1, rank=0).resolve("auto") == root / "iter_0000004"
    assert "no checksums" in caplog.text and "unverified" in caplog.text
    assert mod_ckpt(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "iter_0000004: unverified" in out and "iter_0000002: good" in out


def test_prune_keeps_the_newest_verified_checkpoint_while_newer_ones_are_unverified_or_bad(tmp_path):
    ck = CheckpointDir(tmp_path / "ck")

    def save(step: int) -> Path:
        (ck.begin(step) / "weights.bin").write_bytes(os.urandom(64))
        return ck.commit(step, {})

    save(1)
    for step in (2, 3):  # written by an older mod-train: no checksums
        d = save(step)
        record = json.loads((d / "complete.json").read_text())
        del record[integrity.FILES_KEY]
        (d / "complete.json").write_text(json.dumps(record))
    ck.prune(1)
    assert [s for s, _ in ck.list_complete()] == [1, 3]  # 1 kept: the newest with checksums
    integrity.mark_bad(ck.final_dir(3), "test")
    save(4)
    ck.prune(1)
    assert ck.final_dir(3).is_dir()  # bad: kept as evidence, never pruned
    assert [s for s, _ in ck.list_complete()] == [4]
    # Re-saving a step whose checkpoint was marked bad keeps the bad copy under another name.
    integrity.mark_bad(ck.final_dir(4), "test")
    save(4)
    assert len(list(ck.root.glob("bad_iter_0000004_*"))) == 1 and ck.find_latest()[0] == 4


def test_a_save_with_non_finite_weights_is_refused_before_anything_is_written(tmp_path):
    import torch

    from mod_train.callbacks.checkpointing import NonFiniteWeightsError, refuse_nonfinite_weights

    class Engine:
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    refuse_nonfinite_weights(Engine, 3, tmp_path)  # finite: no error
    with torch.no_grad():
        Engine.module[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"step 3.*1\.weight"):
        refuse_nonfinite_weights(Engine, 3, tmp_path)


def test_resume_from_a_damaged_latest_falls_back_trains_finite_and_keeps_the_good_one(written, tmp_path):
    """End to end: DeepSpeed's model states of the latest checkpoint overwritten (on the old code:
    resume succeeded and trained NaN, then pruned the good checkpoints)."""
    from tests.helpers_train import losses

    run_dir = _copy(written, tmp_path)
    root = run_dir / "checkpoints"
    _overwrite(root / "iter_0000004" / "state" / "mp_rank_00_model_states.pt")
    r = _train(run_dir, "train.max_steps=6", "checkpoint.keep_last=1")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "iter_0000004/state/mp_rank_00_model_states.pt" in out and "marked bad" in out, out[-3000:]
    assert f"resumed from {root / 'iter_0000002'} at step 2" in out, out[-3000:]
    steps = losses(run_dir)
    assert all(math.isfinite(v) for v in steps.values()) and max(steps) == 6
    bad = list(root.glob("bad_iter_0000004_*"))  # replaced by the re-save of step 4, kept
    assert len(bad) == 1 and integrity.bad_reason(bad[0])
    assert CheckpointDir(root).find_latest()[0] == 6
    assert CheckpointDir(root).verify(root / "iter_0000006").status is integrity.Status.GOOD


def test_readers_outside_training_name_a_damaged_file(written, tmp_path):
    """mod-export / mod-generate read through read.resolve_iter_dir: a truncated model/*.distcp
    (on the old code: accepted, failing later inside torch.distributed.checkpoint) is named."""
    from mod_train.checkpoint.read import CheckpointReadError, resolve_iter_dir

    root = _copy(written, tmp_path) / "checkpoints"
    _truncate(root / "iter_0000004" / "model" / "__0_0.distcp")
    with pytest.raises(CheckpointReadError, match=r"iter_0000004/model/__0_0\.distcp is \d+ bytes"):
        resolve_iter_dir(root)
    assert resolve_iter_dir(root, "2") == root / "iter_0000002"
    assert not (root / "iter_0000004" / integrity.BAD_MARKER).exists()  # read-only


def test_mod_ckpt_is_a_console_script_and_says_when_there_is_no_checkpoint(tmp_path):
    exe = Path(sys.executable).with_name("mod-ckpt")
    r = subprocess.run([str(exe), "verify", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{tmp_path} holds no checkpoint" in r.stderr
