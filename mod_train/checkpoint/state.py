"""What a checkpoint holds and how all ranks write/read it; the directory protocol is layout.py's.

Every rank writes into the staging directory of the step: the layout-free ``model/`` weights and
``optimizer/`` Adam moments (fp32 masters under bf16) of model_io.py, per-rank RNG states, and only
with ``checkpoint.deepspeed_files`` DeepSpeed's own files (a second copy of the same state); rank 0
then commits it atomically and moves the ``latest`` pointer. A crash before the commit leaves the
previous checkpoint as the latest complete one. With ``checkpoint.async_save`` the layout-free
copy is written in the background (background.py) and committed once every rank has finished.

Resuming loads the weights from ``model/`` (before the engine is built: ZeRO makes its fp32
partitions from them), then the Adam moments and their step count from ``optimizer/``, the LR
schedule position, step and consumed samples from complete.json and, under the same layout, each
rank's RNG states: bitwise exact under the same layout (tests/distributed/test_exact_resume.py)
and continuing under any other (TP, PP, virtual PP, EP, DP size or ZeRO stage changed). A
checkpoint that holds DeepSpeed's files (written by an older mod-train or with
``checkpoint.deepspeed_files=true``) resumes from them under its own layout, as before.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mod_train.checkpoint import read
from mod_train.checkpoint.background import BackgroundWrites
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
    def __init__(self, root: Path, keep_last: int, rank: int, layout: Optional[dict] = None, *,
                 deepspeed_files: bool = False, async_save: bool = False,
                 write_delay_s: Optional[float] = None):
        self.dir = CheckpointDir(root)
        self.keep_last = keep_last
        self.rank = rank
        # This run's parallel layout (LAYOUT_KEYS + world_size), recorded in complete.json.
        self.layout = dict(layout or {})
        self.deepspeed_files = deepspeed_files
        self.background = BackgroundWrites(write_delay_s) if async_save else None

    def save(self, engine, state: TrainState, metadata: dict) -> Path:
        """Write the checkpoint of ``state.step`` (collective). Synchronous: committed on return.
        Background (async_save): returns once the state is snapshotted; the final directory it
        returns appears when ``poll``/``finish`` commit it. A save still in flight commits first."""
        self.finish_pending()
        if self.rank == 0:
            staging = self.dir.begin(state.step)
        barrier()
        staging = self.dir.staging_dir(state.step)
        if self.deepspeed_files:
            engine.save_checkpoint(str(staging), tag=DS_TAG, client_state={"train_state": asdict(state)},
                                   save_latest=False)
        rng_dir = staging / RNG_DIR
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_dir / f"rank_{self.rank:05d}.pt")
        record = {**metadata, "train_state": asdict(state)}  # as of this step, whenever it commits
        if self.layout:
            record["layout"] = self.layout
        self._save_layout_free(engine, staging, state, metadata)
        if self.background is None:
            return self._commit(state.step, record)
        self.background.arm(functools.partial(self._commit, state.step, record))
        return self.dir.final_dir(state.step)

    def _commit(self, step: int, record: dict) -> Path:
        barrier()  # every rank's files are written
        final = self.dir.final_dir(step)
        if self.rank == 0:
            final = self.dir.commit(step, record, keep_last=self.keep_last)
        barrier()
        return final

    def poll(self) -> Optional[Path]:
        """Commit the background save if every rank has finished writing it (collective; each step)."""
        return self.background.poll() if self.background is not None else None

    def finish_pending(self) -> Optional[Path]:
        """Wait for the background save in flight, if any, and commit it (collective)."""
        return self.background.finish() if self.background is not None else None

    def abandon_pending(self) -> None:
        """Stop a background write without committing it (on an error; local): ``latest`` stays."""
        if self.background is not None:
            self.background.abandon()

    def _save_layout_free(self, engine, staging: Path, state: TrainState, metadata: dict) -> None:
        from mod_train.checkpoint import model_io

        chunks = list(engine.module)
        info = {"layout": self.layout, "step": state.step, "config": metadata.get("config")}
        schedule = self.background.schedule if self.background is not None else None
        with model_io.gathered_params(engine):  # ZeRO-3: the writer forks while the weights are gathered
            model_io.save_model(chunks, staging / MODEL_DIR, info=info, background=schedule)
        model_io.save_optimizer(engine, chunks, staging / OPTIM_DIR, background=schedule)

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

    def reads_layout_free(self, path: Path) -> bool:
        """True when resuming ``path`` reads ``model/`` + ``optimizer/``: another layout's checkpoint,
        or one without DeepSpeed's files (the default since checkpoint.deepspeed_files exists)."""
        return self.needs_reshard(path) or not read.has_deepspeed_files(path)

    def load_weights_for_reshard(self, chunks, path: Path) -> None:
        """Weights from ``<path>/model`` into this layout's chunks (before the engine is built)."""
        if not read.has_model_dir(path):
            if not self.needs_reshard(path):
                raise RuntimeError(f"{path} holds neither layout-free weights ('{MODEL_DIR}/') nor DeepSpeed's "
                                   f"files ('{DS_TAG}/'): it is not a complete mod-train checkpoint.")
            raise RuntimeError(
                f"{path} was written with layout {_layout_text(self.saved_layout(path))} and this run uses "
                f"{_layout_text(self.layout)}, but it has no layout-free '{MODEL_DIR}/' directory to reshard "
                f"from (written by an older mod-train). Resume it with the layout it was written with.")
        read.load_model_dir(chunks, path)

    def load_resharded(self, engine, path: Path, scheduler) -> TrainState:
        """Continue from the layout-free copy (``reads_layout_free``); weights are already in the chunks.

        Adam moments and their step count come from ``<path>/optimizer`` (restarted from zero, with a
        warning, if it is missing); step, LR schedule position and consumed samples from
        complete.json; under the same layout each rank's RNG states too (under another they belong
        to the old ranks and are not restored: they only matter with dropout).
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
        if not self.needs_reshard(path):
            rng = read.read_rng_state(path, self.rank)
            if rng is not None:
                set_rng_state(rng)
        return state

    def load(self, engine, path: Path) -> TrainState:
        """Everything of ``path`` into a built engine (a rollback), from whichever copy it holds."""
        if self.reads_layout_free(path):
            from mod_train.checkpoint import model_io

            model_io.load_model_into_engine(engine, list(engine.module), path / MODEL_DIR)
            return self.load_resharded(engine, path, engine.lr_scheduler)
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
