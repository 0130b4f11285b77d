"""Checkpoint storage at start (read-only, too small), a full disk during a save, stale leftovers.

Real file systems: a read-only bind mount and small tmpfs mounts (the tests run as root, which
ignores permission bits, so chmod would prove nothing). Where mounting is not permitted the tests
skip and say so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mod_train.config.load import compose, to_config
from mod_train.config.validate import ConfigError, validate

MOCK = ["data=mock", "model.vocab_size=256", "tracking.enabled=false"]


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    done = []

    def mount(target: Path, *args) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        if not _mount(*args, str(target)):
            pytest.skip(f"cannot mount ({' '.join(args)}) in this sandbox: needs root / CAP_SYS_ADMIN")
        done.append(target)
        return target

    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _cfg(tmp_path: Path, ckpt_dir: Path, *extra: str):
    cfg = to_config(compose(MOCK + [f"train.run_dir={tmp_path / 'run'}", f"checkpoint.dir={ckpt_dir}", *extra]))
    return cfg, validate(cfg, world_size=1, has_cuda=False)


def test_read_only_checkpoint_storage_is_refused_at_start(tmp_path, mounts):
    from mod_train.preflight import preflight

    src = tmp_path / "src"
    (src / "checkpoints").mkdir(parents=True)
    ro = mounts(tmp_path / "ro", "--bind", "-o", "ro", str(src))
    if not _mount("-o", "remount,bind,ro", str(ro)):
        pytest.skip("cannot remount the bind mount read-only in this sandbox")
    cfg, derived = _cfg(tmp_path, ro / "checkpoints")
    with pytest.raises(ConfigError) as e:
        preflight(cfg, derived, main_rank=True)
    msg = str(e.value)
    assert "checkpoint.dir" in msg and str(ro / "checkpoints") in msg and "not writable" in msg, msg
    assert not (tmp_path / "run" / ".run.lock").exists(), "the lock is released on refusal"


def test_too_small_checkpoint_storage_is_refused_at_start_with_the_bytes_needed(tmp_path, mounts):
    from mod_train.checkpoint.storage import estimate_checkpoint_bytes
    from mod_train.preflight import preflight

    small = mounts(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs")
    # ~1.5M parameters: about 40 MB per checkpoint, far above the 256 KiB mount.
    cfg, derived = _cfg(tmp_path, small / "checkpoints", "model.hidden_size=128", "model.num_attention_heads=4")
    need = estimate_checkpoint_bytes(cfg, derived)
    assert need > 1 << 20
    with pytest.raises(ConfigError) as e:
        preflight(cfg, derived, main_rank=True)
    msg = str(e.value)
    assert "not enough free space" in msg and str(small / "checkpoints") in msg and f"{need} bytes" in msg, msg
    # The same storage with checkpoints off is fine.
    cfg, derived = _cfg(tmp_path, small / "checkpoints", "checkpoint.save=false")
    preflight(cfg, derived, main_rank=True).release()


def test_parameter_estimate_matches_the_built_model(megatron_tp1):
    """The start-time estimate counts the parameters the model really has (within 2%)."""
    from mod_train.checkpoint.storage import estimate_parameters
    from mod_train.model.build import build_model_chunks, count_parameters

    for extra in ([], ["model=tiny_moe"], ["model=tiny_mod"]):
        cfg = to_config(compose(MOCK + list(extra)))
        derived = validate(cfg, world_size=1, has_cuda=False)
        real = count_parameters(build_model_chunks(cfg, derived))
        est = estimate_parameters(cfg, derived)
        assert abs(est - real) <= 0.02 * real, (extra, est, real)


def test_disk_full_during_a_save_says_disk_full_with_path_and_bytes(tmp_path, mounts):
    import torch

    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.checkpoint.storage import CheckpointDiskFull, reporting_disk_full

    root = mounts(tmp_path / "full", "-t", "tmpfs", "-o", "size=1m", "tmpfs") / "checkpoints"
    cd = CheckpointDir(root)
    staging = cd.begin(10)
    with pytest.raises(CheckpointDiskFull) as e:
        with reporting_disk_full(root):
            # What DeepSpeed and the layout-free writer do: torch.save of a state dict (4 MB here).
            torch.save({"w": torch.zeros(1 << 20)}, staging / "model_states.pt")
    msg = str(e.value)
    assert "disk full" in msg and str(root) in msg and "bytes" in msg, msg
    assert "unexpected pos" in str(e.value.__cause__) or "No space" in str(e.value.__cause__)
    # Other errors pass through untouched.
    with pytest.raises(KeyError):
        with reporting_disk_full(root):
            raise KeyError("not a disk problem")


def test_stale_staging_and_deleting_directories_are_cleaned_at_start(tmp_path):
    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.preflight import preflight

    root = tmp_path / "run" / "checkpoints"
    cd = CheckpointDir(root)
    cd.begin(5)
    cd.commit(5, {}, keep_last=5)
    cd.begin(10)  # a save killed before its commit
    (root / ".staging_iter_0000010" / "partial.pt").write_bytes(b"x" * 100)
    (root / ".deleting_iter_0000001").mkdir()  # a prune killed half-way
    (root / ".deleting_iter_0000001" / "model.pt").write_bytes(b"x" * 100)
    cfg, derived = _cfg(tmp_path, root)
    preflight(cfg, derived, main_rank=True).release()
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", "latest"]


def test_a_training_run_that_fills_its_disk_says_disk_full_and_keeps_the_last_checkpoint(tmp_path, mounts):
    """End to end (one rank, real DeepSpeed and layout-free saves): room for one checkpoint and a
    half; the second save fails with "disk full", the path and the bytes, and the first checkpoint
    stays the latest, complete one."""
    import os
    import sys

    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.checkpoint.storage import estimate_checkpoint_bytes
    from mod_train.distributed.world import free_port

    overrides = MOCK + [f"train.run_dir={tmp_path / 'run'}", "train.max_steps=3", "checkpoint.save_interval=1",
                        "checkpoint.keep_last=3"]
    cfg = to_config(compose(overrides))
    need = estimate_checkpoint_bytes(cfg, validate(cfg, world_size=1, has_cuda=False))
    fs = mounts(tmp_path / "fs", "-t", "tmpfs", "-o", f"size={int(need * 1.45) // 4096 * 4096}", "tmpfs")
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("MOD_TRAIN_RUN_LOCK", None)
    r = subprocess.run([sys.executable, "-m", "mod_train.train", *overrides, f"checkpoint.dir={fs / 'ck'}"],
                       cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert f"disk full while saving a checkpoint to {fs / 'ck'}" in out and "bytes" in out, out[-3000:]
    assert CheckpointDir(fs / "ck").find_latest()[0] == 1
