"""``eval.lm_eval``: lm-evaluation-harness during training, on rank 0 after every ``interval``-th
step (the model in eval mode, MoD layers on causal routing); every rank waits at a barrier, so the
next step starts together. Scores go through the run logger as ``lm_eval/<task>/<metric>``.
Needs TP=PP=EP=1 (validated at start): rank 0 then holds the whole model."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mod_train.callbacks.base import Callback
from mod_train.checkpoint.state import TrainState


class LmEvalCallback(Callback):
    def __init__(self, model, tokenizer_path: str, seq_length: int, tasks: Sequence[str], interval: int,
                 limit: Optional[int], run_logger, is_main: bool) -> None:
        from mod_train.hf.deps import require

        require("lm_eval")
        self.model, self.tokenizer_path, self.seq_length = model, tokenizer_path, seq_length
        self.tasks, self.interval, self.limit = list(tasks), interval, limit
        self.run_logger, self.is_main = run_logger, is_main
        self._tokenizer = None

    def on_step(self, state: TrainState, step) -> None:
        if self.interval <= 0 or state.step % self.interval:
            return
        if self.is_main:
            self.run_logger.log(state.step, self.scores())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def scores(self) -> dict:
        from mod_train.data.tokenizer import load_tokenizer
        from mod_train.evaluation.lm_eval_run import make_mod_train_lm, metric_rows, run_tasks
        from mod_train.model.unwrap import unwrap_model

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        model = unwrap_model(self.model)
        was_training = model.training
        try:
            with torch.no_grad():
                lm = make_mod_train_lm(model, self._tokenizer, self.seq_length)
                return metric_rows(run_tasks(lm, self.tasks, self.limit))
        finally:
            model.train(was_training)
