"""The checkpoint directory's storage: checked at start, and a full disk reported as one.

A read-only checkpoint directory used to be found at the first save (every step before it lost),
and a full disk failed with ``RuntimeError: [enforce fail at inline_container.cc:672] unexpected
pos`` (torch's zip writer hides the errno). Here: ``check_storage`` at start (writable, enough
free space for one more checkpoint, estimated from the model), and ``reporting_disk_full`` turns
a save that failed for lack of space into ``CheckpointDiskFull`` naming the path and the bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

# What one saved parameter costs on disk: the layout-free copy (weights in the training dtype, two
# fp32 Adam moments, the fp32 master under bf16) and, with checkpoint.deepspeed_files, DeepSpeed's
# files (weights in the training dtype plus fp32 master weights and two Adam moments).
FP32_BYTES, ADAM_STATE_BYTES = 4, 12
MOMENTS_BYTES = 8
MARGIN = 1.1  # metadata, RNG states, pickling overhead


class StorageError(OSError):
    """The checkpoint directory cannot take checkpoints; the message names it and what to do."""


class CheckpointDiskFull(StorageError):
    """A checkpoint save ran out of space."""


def estimate_parameters(cfg, derived) -> int:
    """All parameters of the model (every rank together), from the config alone (no model built)."""
    m = cfg.model
    h, layers = m.hidden_size, m.num_layers
    head_dim = h // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attention = h * h * 2 + 2 * h * groups * head_dim + 2 * h  # q, out, k+v, two norms

    def mlp(ffn: int) -> int:
        return (3 if str(m.activation) == "swiglu" else 2) * h * ffn

    total = derived.padded_vocab_size * h * (1 if m.tie_embeddings else 2) + h  # embedding, output, final norm
    if str(m.position_embedding) == "learned_absolute":
        total += m.seq_length * h
    moe_layers, mod_layers = set(derived.moe_layers), set(derived.mod_layers)
    for layer in range(layers):
        total += attention
        if layer in moe_layers:
            e = m.moe.num_experts
            total += e * mlp(m.moe.ffn_hidden_size or derived.ffn_hidden_size) + h * (e + (m.moe.num_noop_experts or 0))
            if m.moe.shared_expert_ffn_hidden_size:
                total += mlp(m.moe.shared_expert_ffn_hidden_size)
        else:
            total += mlp(derived.ffn_hidden_size)
        if layer in mod_layers:
            total += h + h * max(m.mod.predictor_hidden, h // 8) * 2  # router (+ causal predictor, at most)
    return int(total)


def estimate_checkpoint_bytes(cfg, derived) -> int:
    params = estimate_parameters(cfg, derived)
    weights = 2 if derived.bf16 else FP32_BYTES
    per_param = weights + MOMENTS_BYTES + (FP32_BYTES if derived.bf16 else 0)
    if cfg.checkpoint.deepspeed_files:
        per_param += weights + ADAM_STATE_BYTES
    return int(params * per_param * MARGIN)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_storage(root: Path, bytes_needed: int, what: str = "checkpoint.dir") -> None:
    """StorageError unless ``root`` can be created, written and has ``bytes_needed`` free."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_probe.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise StorageError(e.errno, f"{what}: the checkpoint directory {root} is not writable "
                                    f"({e.strerror or e}): checkpoints could not be saved. Fix its permissions or "
                                    f"mount, or point {what} at a writable directory.") from None
    free = shutil.disk_usage(_existing_parent(root)).free
    if free < bytes_needed:
        raise StorageError(errno.ENOSPC, f"{what}: not enough free space for a checkpoint in {root}: "
                                         f"{_human(free)} free ({free} bytes), one checkpoint needs about "
                                         f"{_human(bytes_needed)} ({bytes_needed} bytes, estimated from the "
                                         f"model's parameters with their Adam states). Free "
                                         f"space or point {what} at a larger file system.")


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def is_disk_full(exc: BaseException, root: Path) -> bool:
    """True when ``exc`` (or its cause) says the disk is full, or hides it (torch's zip writer)."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if "unexpected pos" in text or "file write failed" in text:
            # torch.save's zip writer drops the errno; a full file system is the usual reason.
            try:
                return shutil.disk_usage(_existing_parent(root)).free < (64 << 20)
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


def newest_checkpoint_bytes(root: Path) -> Optional[int]:
    from mod_train.checkpoint.layout import CheckpointDir

    complete = CheckpointDir(root).list_complete()
    return _dir_bytes(complete[-1][1]) if complete else None


@contextmanager
def reporting_disk_full(root: Path) -> Iterator[None]:
    """Around a checkpoint save: a failure for lack of space becomes CheckpointDiskFull, which names
    the directory, the free bytes and the bytes a checkpoint of this run needs."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised unless it is a full disk
        # BaseException: torch.distributed.checkpoint wraps a rank's write error in one
        # (CheckpointException); interrupts and exits pass through untouched.
        root = Path(root)
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)) or not is_disk_full(e, root):
            raise
        try:
            free = shutil.disk_usage(_existing_parent(root)).free
        except OSError:
            free = -1
        size = newest_checkpoint_bytes(root)
        if size is not None:
            need = f"about {size} bytes ({_human(size)}, the size of the newest complete checkpoint)"
        else:
            written = sum(_dir_bytes(p) for p in root.glob(".staging_*")) if root.is_dir() else 0
            need = f"more than the {written} bytes ({_human(written)}) written before the disk filled"
        raise CheckpointDiskFull(errno.ENOSPC, f"disk full while saving a checkpoint to {root}: {free} bytes free, "
                                               f"a checkpoint needs {need}. Free space (or lower "
                                               f"checkpoint.keep_last) and resume with checkpoint.resume=auto; the "
                                               f"previous checkpoints are intact.") from e
