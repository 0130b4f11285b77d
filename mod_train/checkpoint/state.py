"""What a checkpoint holds and how all ranks write/read it; the directory protocol is layout.py's.

Every rank writes into the staging directory of the step (DeepSpeed: model shards, ZeRO
optimizer partitions, LR scheduler; ours: per-rank RNG states, plus the layout-free ``model/``
weights and ``optimizer/`` Adam moments of model_io.py); rank 0 then commits it atomically and
moves the ``latest`` pointer. A crash before the commit leaves the previous checkpoint as the
latest complete one.

Resuming under the layout the checkpoint was written with loads DeepSpeed's files (bitwise
exact). Under another layout (TP, PP, virtual PP, EP, DP size or ZeRO stage changed) the weights
come from ``model/`` (loaded by the trainer before the engine is built) and the Adam moments from
``optimizer/``; step, LR schedule position and consumed samples from complete.json.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mod_train.checkpoint import read
from mod_train.checkpoint.layout import CheckpointDir
from mod_train.checkpoint.read import DS_TAG, MODEL_DIR, OPTIM_DIR, RNG_DIR
from mod_train.config.validate import expert_tensor_parallel_size
from mod_train.distributed.world import barrier

__all__ = ["DS_TAG", "MODEL_DIR", "OPTIM_DIR", "LAYOUT_KEYS", "TrainState", "Checkpointer", "layout_of",
           "rng_state", "set_rng_state", "set_schedule_position"]
# What decides which DeepSpeed files a rank reads; sequence parallelism does not change them.
LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp", "dp", "zero_stage")


@dataclass
class TrainState:
    step: int = 0
    consumed_train_samples: int = 0
    mlflow_run_id: Optional[str] = None
    # Training FLOPs of all devices up to `step` (flops.py's count; integrated MoDE at its measured
    # no-op share). None in checkpoints written before it was kept: the trainer re-derives it.
    total_flops: Optional[float] = None
    # Resilience counters of the whole run (kept across resumes): updates skipped for any reason,
    # of which for a non-finite loss/gradient; loss spikes seen; rollbacks to a checkpoint.
    skipped_iterations: int = 0
    nan_iterations: int = 0
    loss_spikes: int = 0
    rollbacks: int = 0


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


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, rank: int, layout: Optional[dict] = None):
        self.dir = CheckpointDir(root)
        self.keep_last = keep_last
        self.rank = rank
        # This run's parallel layout (LAYOUT_KEYS + world_size), recorded in complete.json.
        self.layout = dict(layout or {})

    def save(self, engine, state: TrainState, metadata: dict) -> Path:
        if self.rank == 0:
            staging = self.dir.begin(state.step)
        barrier()
        staging = self.dir.staging_dir(state.step)
        engine.save_checkpoint(str(staging), tag=DS_TAG, client_state={"train_state": asdict(state)},
                               save_latest=False)
        self._save_layout_free(engine, staging, state, metadata)
        rng_dir = staging / RNG_DIR
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_dir / f"rank_{self.rank:05d}.pt")
        barrier()
        final = self.dir.final_dir(state.step)
        if self.rank == 0:
            record = {**metadata, "train_state": asdict(state)}
            if self.layout:
                record["layout"] = self.layout
            final = self.dir.commit(state.step, record, keep_last=self.keep_last)
        barrier()
        return final

    def _save_layout_free(self, engine, staging: Path, state: TrainState, metadata: dict) -> None:
        from mod_train.checkpoint import model_io

        chunks = list(engine.module)
        info = {"layout": self.layout, "step": state.step, "config": metadata.get("config")}
        with model_io.gathered_params(engine):
            model_io.save_model(chunks, staging / MODEL_DIR, info=info)
        model_io.save_optimizer(engine, chunks, staging / OPTIM_DIR)

    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint to load, verified: rank 0 checks every file's size and checksum (marking a
        damaged checkpoint bad and falling back to the newest good one for ``auto``) and sends its
        verdict to all ranks, so every rank loads the same directory or all raise the same error."""
        import torch.distributed as dist

        answer: list = [None, None]
        if self.rank == 0:
            try:
                answer[0] = self.dir.resolve_resume(resume, verify=True)
            except ValueError as e:
                answer[1] = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(answer, src=0)
        if answer[1] is not None:
            raise ValueError(answer[1])
        return None if answer[0] is None else Path(answer[0])

    def saved_layout(self, path: Path) -> Optional[dict]:
        """The layout recorded in ``path``'s complete.json (None for checkpoints that predate it)."""
        return read.saved_layout(path)

    def needs_reshard(self, path: Path) -> bool:
        """True when ``path`` was written under a layout whose DeepSpeed files this run cannot read."""
        saved = self.saved_layout(path)
        if saved is None or not self.layout:
            return False
        saved, ours = _with_etp(saved), _with_etp(self.layout)
        return any(saved.get(k) != ours.get(k) for k in LAYOUT_KEYS)

    def load_weights_for_reshard(self, chunks, path: Path) -> None:
        """Weights from ``<path>/model`` into this layout's chunks (before the engine is built)."""
        if not read.has_model_dir(path):
            raise RuntimeError(
                f"{path} was written with layout {_layout_text(self.saved_layout(path))} and this run uses "
                f"{_layout_text(self.layout)}, but it has no layout-free '{MODEL_DIR}/' directory to reshard "
                f"from (written by an older mod-train). Resume it with the layout it was written with.")
        read.load_model_dir(chunks, path)

    def load_resharded(self, engine, path: Path, scheduler) -> TrainState:
        """Continue from a checkpoint of another layout; weights are already in the chunks.

        Adam moments come from ``<path>/optimizer`` (restarted from zero, with a warning, if it is
        missing); step, LR schedule position and consumed samples from complete.json. Per-rank RNG
        states belong to the old ranks and are not restored (they only matter with dropout).
        """
        import logging

        from mod_train.checkpoint import model_io

        log = logging.getLogger("mod_train")
        state = TrainState(**read.saved_train_state(path))
        chunks = list(engine.module)
        optim_dir = path / OPTIM_DIR
        if model_io.is_model_dir(optim_dir):
            model_io.load_optimizer(engine, chunks, optim_dir, state.step)
        else:
            msg = (f"WARNING: {path} has no '{OPTIM_DIR}/' directory: resharding restarts the Adam moments from "
                   f"zero (weights, step {state.step}, LR schedule and data position are restored)")
            log.warning(msg)
            if self.rank == 0:
                print(msg, flush=True)
        set_schedule_position(engine, scheduler, state.step)
        engine.global_steps = state.step
        engine.global_samples = state.consumed_train_samples
        return state

    def load(self, engine, path: Path) -> TrainState:
        load_path, client = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}/{DS_TAG}: the files for "
                               f"this rank's layout are missing (was it written with another parallel layout?).")
        rng = read.read_rng_state(path, self.rank)
        if rng is not None:
            set_rng_state(rng)
        return TrainState(**client["train_state"])


def layout_of(cfg, derived) -> dict:
    """The parallel layout of a run, as recorded in complete.json (compared on resume)."""
    par = cfg.parallel
    return {"tp": par.tp, "pp": par.pp, "vpp": par.vpp, "ep": par.ep, "etp": expert_tensor_parallel_size(par),
            "cp": par.cp, "dp": derived.dp,
            "zero_stage": par.zero_stage, "sequence_parallel": bool(par.sequence_parallel),
            "world_size": derived.world_size}


def _with_etp(layout: dict) -> dict:
    """A layout with its expert tensor parallel size: checkpoints written before etp was recorded
    split their experts over the dense TP size (megatron's default)."""
    return {**layout, "etp": layout.get("etp", layout.get("tp"))}


def set_schedule_position(engine, scheduler, step: int) -> None:
    """Put a LambdaLR schedule (and the optimizer's LRs) where it is after ``step`` optimizer steps."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)


def _layout_text(layout: Optional[dict]) -> str:
    if not layout:
        return "(unknown)"
    return " ".join(f"{k}={layout.get(k)}" for k in LAYOUT_KEYS)
