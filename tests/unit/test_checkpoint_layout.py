"""Checkpoint layout: commit / find_latest / prune, and crash safety at every point of a commit."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import pytest

from mod_train.checkpoint.layout import COMPLETE_FILE, CheckpointDir, read_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- helpers -----------------------------------------------------------------------------------

def _payload(step: int, i: int, size: int, tag: str = "") -> bytes:
    block = hashlib.sha256(f"{tag}{step}-{i}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _write_files(staging: Path, step: int, n: int = 3, size: int = 4096, tag: str = "") -> Dict[str, str]:
    """Fake a multi-rank checkpoint; returns relative path -> sha256 for _assert_intact."""
    expected = {}
    for i in range(n):
        rel = f"mp_rank_{i:02d}/model_states.pt"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        data = _payload(step, i, size, tag)
        (staging / rel).write_bytes(data)
        expected[rel] = hashlib.sha256(data).hexdigest()
    return expected


def _save(cd: CheckpointDir, step: int, keep_last: int = 0, tag: str = "") -> Dict[str, str]:
    expected = _write_files(cd.begin(step), step, tag=tag)
    cd.commit(step, {"consumed_samples": step * 8}, keep_last=keep_last)
    return expected


def _assert_intact(ckpt: Path, expected: Dict[str, str]) -> None:
    got = {
        str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE_FILE
    }
    assert got == expected, f"{ckpt} does not hold exactly the files that were committed"
    assert read_metadata(ckpt)["step"] == int(ckpt.name.rsplit("_", 1)[1])


def _assert_every_iter_dir_complete(root: Path) -> None:
    """The layout invariant: a directory named iter_* only exists once fully committed."""
    for p in root.glob("iter_*"):
        assert read_metadata(p)["step"] == int(p.name[5:]), p


class Crash(BaseException):
    """A simulated process death: BaseException so no `except Exception` in the code absorbs it."""


@contextmanager
def _crash_at(name: str, k: int) -> Iterator[list]:
    """Make the k-th call (1-based) of ``os.<name>`` / ``shutil.rmtree`` raise Crash before acting.

    k=0 only counts calls; the yielded list receives the count.
    """
    mod = shutil if name == "rmtree" else os
    real = getattr(mod, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise Crash(f"{name} #{k}")
        return real(*args, **kwargs)

    setattr(mod, name, wrapper)
    try:
        yield calls
    finally:
        setattr(mod, name, real)


_CRASH_POINTS = ("fsync", "rename", "replace", "rmtree")


def _count_calls(setup, name: str) -> int:
    with _crash_at(name, 0) as calls:
        setup()
    return calls[0]


# ---- normal behaviour ----------------------------------------------------------------------------

def test_commit_find_latest_and_metadata(tmp_path):
    cd = CheckpointDir(tmp_path / "ckpt")
    assert cd.find_latest() is None
    expected = _save(cd, 10)
    step, path = cd.find_latest()
    assert (step, path) == (10, tmp_path / "ckpt" / "iter_0000010")
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000010"
    _assert_intact(path, expected)
    meta = read_metadata(path)
    assert meta["consumed_samples"] == 80 and meta["step"] == 10 and "committed_at" in meta
    assert not cd.staging_dir(10).exists()
    assert cd.staging_dir(10) == tmp_path / "ckpt" / ".staging_iter_0000010"


def test_begin_clears_stale_staging_and_commit_requires_begin(tmp_path):
    cd = CheckpointDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="begin"):
        cd.commit(5, {})
    stale = cd.begin(5)
    (stale / "leftover.bin").write_bytes(b"x")
    assert list(cd.begin(5).iterdir()) == []


def test_bad_metadata_does_not_commit(tmp_path):
    cd = CheckpointDir(tmp_path)
    cd.begin(5)
    with pytest.raises(ValueError, match="step"):
        cd.commit(5, {"step": 6})
    with pytest.raises(TypeError):
        cd.commit(5, {"x": object()})
    assert cd.find_latest() is None and cd.staging_dir(5).is_dir()


def test_prune_keeps_last_k_and_latest(tmp_path):
    cd = CheckpointDir(tmp_path)
    for s in (10, 20, 30, 40):
        _save(cd, s, keep_last=2)
    assert [s for s, _ in cd.list_complete()] == [30, 40]
    assert not any(p.name.startswith(".deleting") for p in tmp_path.iterdir())

    keep_all = CheckpointDir(tmp_path / "all")
    for s in (1, 2, 3):
        _save(keep_all, s, keep_last=0)
    assert [s for s, _ in keep_all.list_complete()] == [1, 2, 3]

    # Resumed from an older checkpoint: latest (20) is below 30/40 but must survive keep_last=1.
    _save(cd, 20, keep_last=1)
    assert cd.find_latest()[0] == 20
    assert [s for s, _ in cd.list_complete()] == [20, 40]


def test_resave_existing_step_replaces_it(tmp_path):
    cd = CheckpointDir(tmp_path)
    _save(cd, 10, tag="old")
    new = _save(cd, 10, tag="new")
    _assert_intact(cd.find_latest()[1], new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", "latest"]


@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage", b"iter_0000099", b"../iter_0000010",
                                     b"iter_0000030"])
def test_corrupt_latest_falls_back_to_newest_complete(tmp_path, content):
    cd = CheckpointDir(tmp_path)
    _save(cd, 10)
    expected = _save(cd, 20)
    (tmp_path / "iter_0000030").mkdir()  # no complete.json: a hand-made/partial dir
    (tmp_path / "iter_0000030" / "model.pt").write_bytes(b"partial")
    staging = cd.begin(40)  # an unfinished save, even with a marker, is never a candidate
    (staging / COMPLETE_FILE).write_text('{"step": 40}')
    (tmp_path / "latest").write_bytes(content)
    step, path = cd.find_latest()
    assert step == 20
    _assert_intact(path, expected)

    (tmp_path / "latest").unlink()
    assert cd.find_latest()[0] == 20


def test_truncated_complete_json_is_not_complete(tmp_path):
    cd = CheckpointDir(tmp_path)
    _save(cd, 10)
    _save(cd, 20)
    (tmp_path / "iter_0000020" / COMPLETE_FILE).write_text('{"step": 2')
    assert cd.find_latest()[0] == 10


def test_clean_stale_staging(tmp_path):
    cd = CheckpointDir(tmp_path)
    expected = _save(cd, 10)
    cd.begin(20)
    (tmp_path / ".deleting_iter_0000005").mkdir()
    (tmp_path / "latest.tmp").write_text("iter_0000020")
    removed = {p.name for p in cd.clean_stale_staging()}
    assert removed == {".staging_iter_0000020", ".deleting_iter_0000005", "latest.tmp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", "latest"]
    _assert_intact(cd.find_latest()[1], expected)
    assert CheckpointDir(tmp_path / "missing").clean_stale_staging() == []


# ---- resolve_resume --------------------------------------------------------------------------------

def test_resolve_resume(tmp_path, monkeypatch):
    cd = CheckpointDir(tmp_path / "ckpt")
    assert cd.resolve_resume("auto") is None
    _save(cd, 10)
    _save(cd, 20)
    assert cd.resolve_resume("auto") == tmp_path / "ckpt" / "iter_0000020"
    assert cd.resolve_resume("none") is None and cd.resolve_resume(None) is None
    assert cd.resolve_resume(str(tmp_path / "ckpt" / "iter_0000010")) == tmp_path / "ckpt" / "iter_0000010"
    assert cd.resolve_resume("iter_0000010") == tmp_path / "ckpt" / "iter_0000010"  # name in root
    monkeypatch.chdir(tmp_path)
    assert cd.resolve_resume("ckpt/iter_0000010") == Path("ckpt/iter_0000010")


def test_resolve_resume_errors_are_clear(tmp_path):
    cd = CheckpointDir(tmp_path / "ckpt")
    _save(cd, 10)
    _save(cd, 20)
    listing = "iter_0000010, " + str(tmp_path / "ckpt" / "iter_0000020")

    with pytest.raises(ValueError, match="does not exist") as e:
        cd.resolve_resume(str(tmp_path / "nope"))
    assert listing in str(e.value)

    partial = tmp_path / "ckpt" / "iter_0000030"
    partial.mkdir()
    with pytest.raises(ValueError, match="no complete.json.*interrupted") as e:
        cd.resolve_resume(str(partial))
    assert listing in str(e.value)

    with pytest.raises(ValueError, match="staging directory"):
        cd.resolve_resume(str(cd.begin(40)))
    with pytest.raises(ValueError, match="checkpoint root"):
        cd.resolve_resume(str(tmp_path / "ckpt"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        cd.resolve_resume(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="empty"):
        cd.resolve_resume("  ")
    bad = tmp_path / "ckpt" / "iter_0000050"
    bad.mkdir()
    (bad / COMPLETE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable complete.json"):
        cd.resolve_resume(str(bad))

    # A checkpoint from another root: its siblings are listed too.
    other = CheckpointDir(tmp_path / "other")
    _save(other, 7)
    (tmp_path / "other" / "iter_0000008").mkdir()
    with pytest.raises(ValueError, match=r"other.*iter_0000007"):
        cd.resolve_resume(str(tmp_path / "other" / "iter_0000008"))


# ---- crash safety ------------------------------------------------------------------------------------

def test_crash_at_every_point_of_a_new_commit(tmp_path):
    """A save of step 20 dies at each fsync/rename/replace/rmtree: 10 (or a complete 20) is found."""
    def scenario(root: Path):
        cd = CheckpointDir(root)
        _save(cd, 5)
        prev = _save(cd, 10)
        new = _write_files(cd.begin(20), 20)
        return cd, prev, new

    points = 0
    for name in _CRASH_POINTS:
        probe = tmp_path / f"probe_{name}"
        cd, _, _ = scenario(probe)
        n = _count_calls(lambda: cd.commit(20, {}, keep_last=2), name)
        for k in range(1, n + 1):
            root = tmp_path / f"{name}_{k}"
            cd, prev, new = scenario(root)
            with pytest.raises(Crash), _crash_at(name, k):
                cd.commit(20, {}, keep_last=2)
            points += 1
            _assert_every_iter_dir_complete(root)
            step, path = cd.find_latest()
            assert step in (10, 20), (name, k)
            _assert_intact(path, prev if step == 10 else new)
            _assert_intact(root / "iter_0000010", prev)  # the previous one survives until pruned
            # Restart: clean up, save again; everything converges.
            cd.clean_stale_staging()
            assert cd.find_latest()[0] == step
            new = _write_files(cd.begin(20), 20)
            cd.commit(20, {}, keep_last=2)
            _assert_intact(cd.find_latest()[1], new)
            assert [s for s, _ in cd.list_complete()] == [10, 20]
    assert points >= 10  # really exercised every point, not a vacuous loop


def test_crash_at_every_point_of_a_resave_of_the_latest_step(tmp_path):
    """Re-saving step 20 (after resuming from 10) while iter_0000020 is `latest`: never lost."""
    def scenario(root: Path):
        cd = CheckpointDir(root)
        _save(cd, 10)
        old = _save(cd, 20, tag="old")
        new = _write_files(cd.begin(20), 20, tag="new")
        return cd, old, new

    for name in _CRASH_POINTS:
        cd, _, _ = scenario(tmp_path / f"probe_{name}")
        n = _count_calls(lambda: cd.commit(20, {}), name)
        for k in range(1, n + 1):
            root = tmp_path / f"{name}_{k}"
            cd, old, new = scenario(root)
            with pytest.raises(Crash), _crash_at(name, k):
                cd.commit(20, {})
            _assert_every_iter_dir_complete(root)
            step, path = cd.find_latest()
            assert step == 20, (name, k)
            try:
                _assert_intact(path, old)
            except AssertionError:
                _assert_intact(path, new)
            cd.clean_stale_staging()  # may restore the moved-aside copy to iter_0000020
            step, path = cd.find_latest()
            assert step == 20 and path.name == "iter_0000020", (name, k)
            assert not any(p.name.startswith(".") for p in root.iterdir())


_CHILD = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from mod_train.checkpoint.layout import CheckpointDir

    def payload(step, i, size):
        block = hashlib.sha256(f"{step}-{i}".encode()).digest()
        return (block * (size // len(block) + 1))[:size]

    root, mode, n_files, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cd = CheckpointDir(root)
    for step in (5, 10):
        st = cd.begin(step)
        for i in range(3):
            (st / f"mp_rank_{i:02d}").mkdir()
            (st / f"mp_rank_{i:02d}" / "model_states.pt").write_bytes(payload(step, i, 4096))
        cd.commit(step, {}, keep_last=2)
    st = cd.begin(20)
    print("writing", flush=True)
    for i in range(n_files):
        (st / f"mp_rank_{i:02d}").mkdir()
        (st / f"mp_rank_{i:02d}" / "model_states.pt").write_bytes(payload(20, i, size))
        if i == 3:
            print("big", flush=True)
    print("commit", flush=True)
    cd.commit(20, {}, keep_last=2)
    print("done", flush=True)
    if mode == "hang":
        import time; time.sleep(60)
""")


def _spawn(root: Path, mode: str, n_files: int, size: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), mode, str(n_files), str(size)],
        stdout=subprocess.PIPE, text=True, env=env,
    )


def _wait_for(proc: subprocess.Popen, line: str) -> None:
    for got in proc.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"child exited (rc={proc.wait()}) before printing {line!r}")


def _expected(step: int, n: int, size: int) -> Dict[str, str]:
    return {f"mp_rank_{i:02d}/model_states.pt": hashlib.sha256(_payload(step, i, size)).hexdigest()
            for i in range(n)}


def test_kill_9_while_writing_a_big_staging_dir(tmp_path):
    root = tmp_path / "ckpt"
    proc = _spawn(root, "hang", n_files=10_000, size=1 << 20)  # far more than it can write
    try:
        _wait_for(proc, "big")
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert len(list((root / ".staging_iter_0000020").iterdir())) > 3
    cd = CheckpointDir(root)
    step, path = cd.find_latest()
    assert step == 10
    _assert_intact(path, _expected(10, 3, 4096))
    assert cd.resolve_resume("auto") == path
    cd.clean_stale_staging()
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", "iter_0000010", "latest"]


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.03, 0.1])
def test_kill_9_during_commit(tmp_path, delay):
    """SIGKILL at various moments of commit(): either 10 or a complete 20 is found, intact."""
    root = tmp_path / "ckpt"
    n_files, size = 24, 256 << 10
    proc = _spawn(root, "hang", n_files=n_files, size=size)
    try:
        _wait_for(proc, "commit")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    _assert_every_iter_dir_complete(root)
    step, path = CheckpointDir(root).find_latest()
    assert step in (10, 20)
    _assert_intact(path, _expected(10, 3, 4096) if step == 10 else _expected(20, n_files, size))
