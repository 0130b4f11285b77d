"""When the loop saves (every ``checkpoint.save_interval`` steps, at max_steps, when the
invocation stops) and what goes with a checkpoint (the config, the MLflow run id, the FLOPs up to
it); the reload of the last checkpoint for a rollback. The files themselves are checkpoint/'s."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mod_train.callbacks.flops import FlopsAccount
from mod_train.checkpoint.resume import roll_back
from mod_train.checkpoint.state import Checkpointer, TrainState
from mod_train.checkpoint.storage import reporting_disk_full


class Checkpointing:
    def __init__(self, checkpointer: Checkpointer, engine, *, enabled: bool, interval: int, max_steps: int,
                 config: dict, flops: FlopsAccount, run_id: Callable[[], Optional[str]]) -> None:
        self.checkpointer = checkpointer
        self.engine = engine
        self.enabled = enabled
        self.interval = interval
        self.max_steps = max_steps
        self.config = config
        self.flops = flops
        self.run_id = run_id

    def due(self, step: int, stopping: bool) -> bool:
        return self.enabled and (step % self.interval == 0 or step == self.max_steps or stopping)

    def save(self, state: TrainState) -> Path:
        refuse_nonfinite_weights(self.engine, state.step, self.checkpointer.dir.root)
        state.mlflow_run_id = self.run_id()  # known late if the tracking server was down at start
        self.flops.charge(state)  # the saved total covers every step up to this one
        with reporting_disk_full(self.checkpointer.dir.root):  # ENOSPC: "disk full", the path and the bytes
            return self.checkpointer.save(self.engine, state, {"config": self.config})

    def restore_last(self, current: TrainState) -> Optional[TrainState]:
        if not self.enabled:
            return None
        self.checkpointer.finish_pending()  # roll back to the newest checkpoint, a background one too
        return roll_back(self.checkpointer, self.engine, current)

    # A background save (checkpoint.async_save) is committed by one of these, on every rank.
    def poll(self) -> None:
        """After each step: commit the background save if every rank has finished writing it."""
        self._committed(self.checkpointer.poll())

    def finish(self) -> None:
        """The loop ends normally (max_steps, exit_interval, a stop signal): wait and commit."""
        self._committed(self.checkpointer.finish_pending())

    def abandon(self) -> None:
        """The loop ends with an error: stop the writer, no commit (``latest`` stays the previous)."""
        self.checkpointer.abandon_pending()

    def _committed(self, path: Optional[Path]) -> None:
        if path is not None and self.checkpointer.rank == 0:
            print(f"committed checkpoint {path} (written in the background)", flush=True)


def refuse_nonfinite_weights(engine, step: int, root: Path) -> None:
    """Raise before anything is written when any rank's weights hold a NaN/Inf: such a checkpoint
    must never become ``latest`` (the trainer skips non-finite updates, so this only fires when
    something bypassed that, e.g. train.skip_nonfinite=false or a damaged resume). All ranks agree
    (MIN all-reduce), so none of them enters the save's collectives alone. Cost: one isfinite pass
    over the local parameters (bench/checkpoint_checksum.py)."""
    import torch
    import torch.distributed as dist

    # The sum is one cheap pass (a NaN/Inf anywhere makes it non-finite); only a non-finite sum
    # pays for the elementwise check, which rules out an overflow of large but finite weights.
    bad = next((name for name, p in engine.module.named_parameters()
                if p.numel() and not bool(torch.isfinite(p.detach().float().sum()))
                and not bool(torch.isfinite(p.detach()).all())), None)
    flag = torch.tensor([0 if bad else 1], dtype=torch.int32,
                        device=next(engine.module.parameters()).device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag.item()) == 0:
        where = f" ({bad} on this rank)" if bad else " (on another rank)"
        raise NonFiniteWeightsError(
            f"refusing to save the checkpoint of step {step}: the weights are not finite{where}. The latest "
            f"checkpoint under {root} is left as it was; resume from it with checkpoint.resume=auto "
            f"(keep train.skip_nonfinite=true, lower optim.lr).")


class NonFiniteWeightsError(RuntimeError):
    """A save refused because a weight is NaN or Inf."""

