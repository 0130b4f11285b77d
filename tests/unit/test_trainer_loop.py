"""The training loop with fake components (no megatron, no DeepSpeed, no process group): hooks in
order, logging/eval/checkpoint cadence, exit_interval and stop signals, skipped updates and their
counters, too many skips, spike rollback with the data window skipped; the update policy's rules
and the watchdog's dump."""

import math
import threading
import time
from pathlib import Path

import pytest

from mod_train.callbacks.base import Callback, Callbacks
from mod_train.callbacks.watchdog import StepWatchdog
from mod_train.engine.signals import WATCHDOG_EXIT_CODE
from mod_train.checkpoint.state import TrainState
from mod_train.config.schema import InjectConfig, SpikeAction
from mod_train.engine.faults import FaultInjector
from mod_train.engine.update_policy import (SpikeDetector, StepCheck, TooManySkippedSteps, UpdatePolicy,
                                            Verdict)
from mod_train.trainer import LoopSettings, Trainer


class FakeStep:
    def __init__(self, loss, verdict):
        self.loss, self.verdict = loss, verdict

    def materialize(self):
        return {"lm loss": self.loss}


class FakeRunner:
    """A 'model' whose weight moves by the batch value on every applied update; the loss is 2.0 or
    2.1 (odd/even batch) times the injected factor."""

    def __init__(self):
        self.weight = 0.0
        self.applied = []  # batch values whose update was applied

    def train_step(self, batches, policy, step, loss_factor=1.0):
        batch = next(batches)
        loss = (2.0 + 0.1 * (batch % 2)) * loss_factor
        verdict = policy.decide(step, StepCheck(finite=math.isfinite(loss), loss=loss)) if policy.screens \
            else Verdict.APPLY
        if verdict.applied:
            self.weight += batch
            self.applied.append(batch)
        return FakeStep(loss, verdict)

    def eval_step(self, batches):
        return {"lm loss": next(batches)}


class FakeCheckpoints:
    def __init__(self, runner, interval=None, enabled=True, max_steps=10):
        self.runner, self.interval, self.enabled, self.max_steps = runner, interval, enabled, max_steps
        self.saved = {}  # step -> (state copy, weight)
        self.calls = []  # (what, step): saves and the background-save hooks, in order

    def due(self, step, stopping):
        return self.enabled and ((self.interval and step % self.interval == 0) or step == self.max_steps or stopping)

    def save(self, state):
        self.saved[state.step] = (TrainState(**vars(state)), self.runner.weight)
        self.calls.append(("save", state.step))
        return Path(f"iter_{state.step}")

    def poll(self):
        self.calls.append(("poll", len(self.runner.applied)))

    def finish(self):
        self.calls.append(("finish", len(self.runner.applied)))

    def abandon(self):
        self.calls.append(("abandon", len(self.runner.applied)))

    def restore_last(self, current):
        if not self.saved:
            return None
        state, weight = self.saved[max(self.saved)]
        self.runner.weight = weight
        restored = TrainState(**vars(state))
        restored.consumed_train_samples = current.consumed_train_samples
        for k in ("skipped_iterations", "nan_iterations", "loss_spikes", "rollbacks"):
            setattr(restored, k, getattr(current, k))
        return restored


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_step_begin(self, state):
        self.events.append(("begin", state.step + 1))

    def on_step(self, state, step):
        self.events.append(("step", state.step, step.verdict))

    def on_eval(self, state, metrics):
        self.events.append(("eval", state.step, metrics))

    def on_save(self, state, path, last):
        self.events.append(("save", state.step, last))

    def on_restore(self, state):
        self.events.append(("restore", state.step))

    def on_stop(self, state, reason):
        self.events.append(("stop", state.step, reason))


def batches_from(consumed):
    """Sample i of the data is the float i + 1 (one sample per step)."""
    i = consumed
    while True:
        i += 1
        yield float(i)


def make_trainer(max_steps=10, interval=None, policy=None, faults=None, stop_signals=None, exit_interval=None,
                 eval_interval=1000, valid=False, checkpoints_enabled=True):
    runner = FakeRunner()
    rec = Recorder()
    ckpt = FakeCheckpoints(runner, interval, checkpoints_enabled, max_steps)
    trainer = Trainer(settings=LoopSettings(max_steps=max_steps, global_batch_size=1, eval_interval=eval_interval,
                                            eval_iters=2, exit_interval=exit_interval),
                      runner=runner, train_batches=batches_from,
                      valid_batches=(lambda: iter([10.0, 20.0])) if valid else None,
                      state=TrainState(), checkpoints=ckpt, callbacks=Callbacks([rec]),
                      policy=policy or UpdatePolicy(skip_nonfinite=True), stop_signals=stop_signals, faults=faults,
                      say=lambda msg: None)
    return trainer, runner, rec, ckpt


def test_hooks_in_order_with_eval_and_checkpoints():
    trainer, runner, rec, ckpt = make_trainer(max_steps=4, interval=2, eval_interval=2, valid=True)
    state = trainer.fit()
    assert state.step == 4 and state.consumed_train_samples == 4
    assert runner.weight == 1 + 2 + 3 + 4
    assert rec.events[:3] == [("begin", 1), ("step", 1, Verdict.APPLY), ("begin", 2)]
    assert ("eval", 2, {"valid lm loss": 15.0}) in rec.events  # mean of the eval_iters batches
    assert [e for e in rec.events if e[0] == "save"] == [("save", 2, False), ("save", 4, True)]
    assert rec.events[-1] == ("stop", 4, "max_steps")
    # evaluation comes before the checkpoint of the same step
    assert rec.events.index(("eval", 2, {"valid lm loss": 15.0})) < rec.events.index(("save", 2, False))


def test_a_background_save_commits_after_later_steps_or_at_the_end_and_is_dropped_on_an_error():
    """checkpoint.async_save's contract with the loop: every step polls (commit once every rank has
    written), a normal end waits for the save in flight (finish) before on_stop; an error drops it
    (abandon: never committed, ``latest`` stays the previous checkpoint) and no finish runs."""
    trainer, _, rec, ckpt = make_trainer(max_steps=4, interval=2)
    trainer.fit()
    assert ckpt.calls == [("poll", 1), ("poll", 2), ("save", 2), ("poll", 3), ("poll", 4), ("save", 4),
                          ("finish", 4)]
    assert rec.events[-1] == ("stop", 4, "max_steps")
    trainer, _, _, ckpt = make_trainer(max_steps=10, exit_interval=3)  # stopping (exit_interval, a signal)
    trainer.fit()
    assert ckpt.calls[-2:] == [("save", 3), ("finish", 3)]

    trainer, runner, rec, ckpt = make_trainer(max_steps=6, interval=2)
    step = runner.train_step

    def failing(batches, policy, number, loss_factor):
        if number == 3:
            raise RuntimeError("rank failure")
        return step(batches, policy, number, loss_factor)

    runner.train_step = failing
    with pytest.raises(RuntimeError, match="rank failure"):
        trainer.fit()
    assert ckpt.calls == [("poll", 1), ("poll", 2), ("save", 2), ("abandon", 2)]
    assert rec.events[-1] == ("stop", 2, "error")


def test_exit_interval_and_stop_signal():
    trainer, _, rec, ckpt = make_trainer(max_steps=10, exit_interval=3)
    assert trainer.fit().step == 3
    assert rec.events[-2:] == [("save", 3, True), ("stop", 3, "exit_interval")]

    class Signals:
        def agreed(self):
            return "SIGUSR1" if trainer.state.step == 2 else None

    trainer, _, rec, _ = make_trainer(max_steps=10, stop_signals=Signals())
    assert trainer.fit().step == 2 and trainer.stopped_by == "SIGUSR1"
    assert rec.events[-1] == ("stop", 2, "SIGUSR1")


def test_nonfinite_loss_skips_the_update_and_is_counted():
    faults = FaultInjector(InjectConfig(nan_loss_at_step=3), rank=0)
    trainer, runner, rec, _ = make_trainer(max_steps=5, faults=faults)
    state = trainer.fit()
    assert runner.applied == [1.0, 2.0, 4.0, 5.0]  # batch 3 consumed, its update never applied
    assert state.step == 5 and state.consumed_train_samples == 5
    assert (state.skipped_iterations, state.nan_iterations) == (1, 1)
    assert ("step", 3, Verdict.SKIP_NONFINITE) in rec.events
    # a fault on another rank only: this rank's loss is untouched
    assert FaultInjector(InjectConfig(nan_loss_at_step=3, ranks=[1]), rank=0).loss_factor(3) == 1.0


def test_too_many_skips_stop_the_run_without_saving():
    policy = UpdatePolicy(skip_nonfinite=True, max_skipped_steps=2)
    trainer, runner, rec, ckpt = make_trainer(max_steps=10, interval=2, policy=policy)
    trainer.runner.train_step = lambda b, p, s, f=1.0: FakeRunner.train_step(runner, b, p, s,
                                                                             float("nan") if s >= 3 else 1.0)
    with pytest.raises(TooManySkippedSteps, match="2 updates in a row were skipped .* at step 4"):
        trainer.fit()
    assert sorted(ckpt.saved) == [2]  # the last good checkpoint stays the latest
    assert rec.events[-1] == ("stop", 4, "error")


def test_spike_rollback_reloads_and_skips_the_spike_window():
    policy = UpdatePolicy(spike=SpikeDetector(window=3, threshold_sigmas=3.0), spike_action=SpikeAction.rollback,
                          max_skipped_steps=3)
    faults = FaultInjector(InjectConfig(spike_loss_at_step=6, spike_factor=1000.0), rank=0)
    trainer, runner, rec, ckpt = make_trainer(max_steps=8, interval=4, policy=policy, faults=faults)
    state = trainer.fit()
    # steps 1-4 applied and saved at 4; 5 applied; 6 spikes -> back to the step-4 weights; the data
    # of steps 5 and 6 (samples 5, 6) is skipped: steps 5..8 train on samples 7..10.
    assert runner.applied == [1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0, 9.0, 10.0]
    assert runner.weight == 1 + 2 + 3 + 4 + 7 + 8 + 9 + 10
    assert ("restore", 4) in rec.events and ("step", 6, Verdict.ROLLBACK) not in rec.events
    assert state.step == 8 and state.consumed_train_samples == 10
    assert (state.loss_spikes, state.rollbacks, state.skipped_iterations) == (1, 1, 1)


def test_rollbacks_in_a_row_stop_the_run():
    policy = UpdatePolicy(spike=SpikeDetector(window=3, threshold_sigmas=3.0), spike_action=SpikeAction.rollback,
                          max_skipped_steps=2)
    trainer, runner, rec, ckpt = make_trainer(max_steps=20, interval=4, policy=policy)
    trainer.runner.train_step = lambda b, p, s, f=1.0: FakeRunner.train_step(runner, b, p, s, 50.0 if s > 4 else 1.0)
    with pytest.raises(TooManySkippedSteps, match="2 updates in a row were skipped .*rollback"):
        trainer.fit()
    assert trainer.state.step == 4 and trainer.state.rollbacks == 2


def test_spike_skip_and_log_actions():
    for action, applied in ((SpikeAction.skip, False), (SpikeAction.log, True)):
        policy = UpdatePolicy(spike=SpikeDetector(window=3, threshold_sigmas=3.0), spike_action=action)
        faults = FaultInjector(InjectConfig(spike_loss_at_step=5), rank=0)
        trainer, runner, _, _ = make_trainer(max_steps=6, policy=policy, faults=faults)
        state = trainer.fit()
        assert (5.0 in runner.applied) is applied
        assert state.loss_spikes == 1 and state.skipped_iterations == (0 if applied else 1)


def test_spike_detector_needs_a_full_window_and_ignores_noise():
    d = SpikeDetector(window=4, threshold_sigmas=3.0)
    for x in (2.0, 2.1, 1.9):
        assert not d.is_spike(100.0)  # window not full yet
        d.accept(x)
    d.accept(2.0)
    assert not d.is_spike(2.2) and d.is_spike(3.0)
    p = UpdatePolicy(skip_nonfinite=False)
    assert p.decide(1, StepCheck(finite=False)) is Verdict.APPLY and not p.screens
    assert UpdatePolicy(skip_steps=[3]).decide(3, StepCheck(finite=True)) is Verdict.SKIP_REQUESTED


def test_watchdog_dumps_all_stacks_and_exits(tmp_path):
    exits = []
    done = threading.Event()

    def on_timeout(code):
        exits.append(code)
        done.set()

    dog = StepWatchdog(0.3, tmp_path, rank=1, on_timeout=on_timeout)
    state = TrainState(step=6)
    dog.on_step_begin(state)
    for _ in range(3):  # beats in time keep it quiet
        time.sleep(0.1)
        dog.on_step_begin(state)
    assert not exits
    assert done.wait(5)
    assert exits == [WATCHDOG_EXIT_CODE]
    text = (tmp_path / "watchdog" / "rank_00001.txt").read_text()
    assert "rank 1: step 7 ran past train.step_timeout_s=0.3" in text
    assert "test_watchdog_dumps_all_stacks_and_exits" in text  # the main thread's stack
    dog.on_stop(state, "max_steps")

    quiet = StepWatchdog(0.2, tmp_path / "q", rank=0, on_timeout=on_timeout)
    quiet.on_step_begin(state)
    quiet.on_stop(state, "max_steps")  # stopped before the deadline: no dump
    time.sleep(0.3)
    assert not (tmp_path / "q" / "watchdog").exists() and exits == [WATCHDOG_EXIT_CODE]
