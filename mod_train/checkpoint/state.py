"""What a checkpoint holds and how all ranks write/read it; the directory protocol is layout.py's.

Every rank writes into the staging directory of the step (DeepSpeed: model shards, ZeRO
optimizer partitions, LR scheduler; ours: per-rank RNG states); rank 0 then commits it
atomically and moves the ``latest`` pointer. A crash before the commit leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mod_train.checkpoint.layout import CheckpointDir

DS_TAG = "state"  # DeepSpeed's sub-directory inside iter_N/


@dataclass
class TrainState:
    step: int = 0
    consumed_train_samples: int = 0
    mlflow_run_id: Optional[str] = None


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, rank: int):
        self.dir = CheckpointDir(root)
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, state: TrainState, metadata: dict) -> Path:
        if self.rank == 0:
            staging = self.dir.begin(state.step)
        _barrier()
        staging = self.dir.staging_dir(state.step)
        engine.save_checkpoint(str(staging), tag=DS_TAG, client_state={"train_state": asdict(state)},
                               save_latest=False)
        rng_dir = staging / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_dir / f"rank_{self.rank:05d}.pt")
        _barrier()
        final = self.dir.final_dir(state.step)
        if self.rank == 0:
            final = self.dir.commit(state.step, {**metadata, "train_state": asdict(state)}, keep_last=self.keep_last)
        _barrier()
        return final

    def resolve(self, resume: str) -> Optional[Path]:
        return self.dir.resolve_resume(resume)

    def load(self, engine, path: Path) -> TrainState:
        load_path, client = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}/{DS_TAG}: the files for "
                               f"this rank's layout are missing (was it written with another parallel layout?).")
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return TrainState(**client["train_state"])
