"""Where a run starts from: the layout-free files (model/ + optimizer/; any layout), the same
layout's DeepSpeed files (checkpoints that hold them), ``checkpoint.init_from`` weights, or nothing
(a fresh run). Also the rollback of a running job to its last checkpoint.

Two phases, because ZeRO builds its fp32 partitions (and ZeRO-3 its parameter shards) from the
weights the model holds when the engine is created:

    plan = ResumePlan.of(checkpointer, cfg.checkpoint.resume, cfg.checkpoint.init_from)
    plan.load_weights(chunks)                      # before build_engine (reshard / init_from)
    state = plan.load_state(engine, scheduler)     # after it (same layout / reshard / fresh)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from mod_train.checkpoint.state import Checkpointer, TrainState


@dataclass(frozen=True)
class ResumePlan:
    checkpointer: Checkpointer
    path: Optional[Path]  # the checkpoint to resume (None: a fresh run)
    reshard: bool  # written under another parallel layout
    init_from: Optional[str]  # weights for a fresh run
    say: Callable[[str], None] = print  # the main rank's console
    layout_free: bool = False  # read model/ + optimizer/ (reshard, or no DeepSpeed files)

    @classmethod
    def of(cls, checkpointer: Checkpointer, resume: str, init_from: Optional[str],
           say: Callable[[str], None] = print) -> "ResumePlan":
        path = checkpointer.resolve(resume)
        return cls(checkpointer, path, path is not None and checkpointer.needs_reshard(path), init_from, say,
                   path is not None and checkpointer.reads_layout_free(path))

    def load_weights(self, chunks: List) -> None:
        """Weights that do not come from DeepSpeed's files, into the chunks before the engine exists."""
        if self.layout_free:
            self.checkpointer.load_weights_for_reshard(chunks, self.path)
        elif self.path is None and self.init_from:
            from mod_train.checkpoint.read import load_weights_from
            from mod_train.hf.import_ import is_hf_source, load_hf_into  # hf:<dir>, a Hugging Face Llama

            if is_hf_source(self.init_from):
                load_hf_into(chunks, self.init_from)
            else:
                load_weights_from(chunks, self.init_from)  # a save_model dir or an iter_* dir (its model/)
            self.say(f"initialised the model from {self.init_from}")

    def load_state(self, engine, scheduler) -> TrainState:
        """The engine's optimizer/LR state and the run's TrainState (a fresh one without a checkpoint)."""
        if self.path is None:
            return TrainState()
        if self.layout_free:
            state = self.checkpointer.load_resharded(engine, self.path, scheduler)
            self.say(f"resumed from {self.path} at step {state.step}" + (
                f", resharded from layout {self.checkpointer.saved_layout(self.path)}" if self.reshard else ""))
            return state
        state = self.checkpointer.load(engine, self.path)
        self.say(f"resumed from {self.path} at step {state.step}")
        return state


def roll_back(checkpointer: Checkpointer, engine, current: TrainState) -> Optional[TrainState]:
    """Reload the last checkpoint of this run (weights, optimizer, LR schedule, RNG) and return the
    state to continue from: the checkpoint's step, but the data position of ``current`` (the
    batches since the checkpoint, the spike window, are skipped) and the run's counters. None when
    there is no checkpoint to go back to."""
    path = checkpointer.resolve("auto")
    if path is None:
        return None
    saved = checkpointer.load(engine, path)
    saved.consumed_train_samples = current.consumed_train_samples
    saved.mlflow_run_id = current.mlflow_run_id or saved.mlflow_run_id
    for counter in ("skipped_iterations", "nan_iterations", "loss_spikes", "rollbacks"):
        setattr(saved, counter, getattr(current, counter))
    return saved
