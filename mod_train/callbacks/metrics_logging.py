"""The log line: on logged steps the step's metrics (the one host sync of the step), throughput
and MFU (tracking/throughput.py), the run's FLOPs and the resilience counters, through the run
logger (console, metrics.jsonl, MLflow, ...); evaluation metrics as they come."""

from __future__ import annotations

import time
from typing import Dict, Optional

from mod_train.callbacks.base import Callback
from mod_train.callbacks.flops import FlopsAccount
from mod_train.checkpoint.state import TrainState
from mod_train.tracking import keys as K
from mod_train.tracking.run_logger import RunLogger
from mod_train.tracking.throughput import peak_memory_gb, throughput_metrics


class MetricsLogging(Callback):
    def __init__(self, run_logger: RunLogger, flops: FlopsAccount, *, log_interval: int, max_steps: int,
                 world_size: int, global_batch_size: int, tokens_per_step: int,
                 peak_tflops: Optional[float], spikes_counted: bool) -> None:
        self.run_logger = run_logger
        self.flops = flops
        self.log_interval = log_interval
        self.max_steps = max_steps
        self.world_size = world_size
        self.global_batch_size = global_batch_size
        self.tokens_per_step = tokens_per_step
        self.peak_tflops = peak_tflops
        self.spikes_counted = spikes_counted
        # Time spent in train steps since the last log line (evaluation and checkpoints excluded,
        # so the per-step time and throughput describe training alone).
        self.step_seconds, self.steps_timed = 0.0, 0
        self._t_step: Optional[float] = None

    def on_step_begin(self, state: TrainState) -> None:
        self._t_step = time.perf_counter()

    def on_step(self, state: TrainState, step) -> None:
        if self._t_step is not None:
            self.step_seconds += time.perf_counter() - self._t_step
            self.steps_timed += 1
        if not (state.step % self.log_interval == 0 or state.step == self.max_steps):
            return
        t_sync = time.perf_counter()
        # The one host sync on logged steps: it also waits for the queued GPU work of the steps
        # since the last log line, so its time counts as step time.
        metrics = step.materialize()
        self.step_seconds += time.perf_counter() - t_sync
        seconds_per_step = self.step_seconds / max(self.steps_timed, 1)
        self.step_seconds, self.steps_timed = 0.0, 0
        metrics.update(throughput_metrics(
            seconds_per_step=seconds_per_step, tokens_per_step=self.tokens_per_step,
            flops_per_token=self.flops.charge(state), world_size=self.world_size,
            consumed_samples=state.consumed_train_samples, global_batch_size=self.global_batch_size,
            total_flops=state.total_flops, peak_tflops=self.peak_tflops, memory_gb=peak_memory_gb()))
        metrics.update(self.counters(state))
        self.run_logger.log(state.step, metrics)

    def counters(self, state: TrainState) -> Dict[str, float]:
        """The run's resilience counters so far (cumulative over resumes)."""
        out = {K.SKIPPED_ITERATIONS: float(state.skipped_iterations), K.NAN_ITERATIONS: float(state.nan_iterations)}
        if self.spikes_counted:
            out.update({K.LOSS_SPIKES: float(state.loss_spikes), K.ROLLBACKS: float(state.rollbacks)})
        return out

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None:
        self.run_logger.log(state.step, metrics)

    def on_restore(self, state: TrainState) -> None:
        self.step_seconds, self.steps_timed, self._t_step = 0.0, 0, None
