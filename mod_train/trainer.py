"""The training loop over components, and the one place that builds them.

``Trainer.fit`` runs steps until max_steps, exit_interval or a stop signal: each step goes through
the step runner (forward/backward, then the update unless the update policy skips it), then the
hooks (``callbacks/``: log line, watchdog, plots at checkpoints), evaluation and checkpoints.
Resilience lives here as decisions, not code paths of its own: a skipped update is counted, too
many in a row stop the run (its last checkpoint stays the latest), a spike may roll the run back
to its last checkpoint. No tracking, plotting, checkpoint-format or model code in this file: the
loop is unit-tested with fake components (tests/unit/test_trainer_loop.py).

    run = build_run(cfg, derived, stop_signals)   # model, engine, data, resume, logger, callbacks
    state = run.trainer.fit()
    run.close("FINISHED")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Tuple

from mod_train.callbacks.base import Callback, Callbacks
from mod_train.checkpoint.state import TrainState
from mod_train.config.schema import Config
from mod_train.config.validate import Derived, validate
from mod_train.engine.faults import FaultInjector
from mod_train.engine.signals import PREEMPTED_EXIT_CODE, StopSignals
from mod_train.engine.update_policy import SpikeDetector, TooManySkippedSteps, UpdatePolicy, Verdict
from mod_train.tracking.keys import valid_key


@dataclass
class LoopSettings:
    """The numbers the loop itself needs (from the validated config)."""

    max_steps: int
    global_batch_size: int
    eval_interval: int
    eval_iters: int
    exit_interval: Optional[int] = None


def loop_settings(cfg: Config, derived: Derived) -> LoopSettings:
    t = cfg.train
    return LoopSettings(max_steps=t.max_steps, global_batch_size=derived.global_batch_size,
                        eval_interval=t.eval_interval, eval_iters=t.eval_iters, exit_interval=t.exit_interval)


def update_policy(cfg: Config, faults: Optional[FaultInjector] = None) -> UpdatePolicy:
    t = cfg.train
    return UpdatePolicy(skip_nonfinite=t.skip_nonfinite, spike=SpikeDetector(t.spike.window, t.spike.threshold_sigmas),
                        spike_action=t.spike.action, max_skipped_steps=t.max_skipped_steps,
                        skip_steps=faults.skip_steps if faults is not None else ())


class Trainer:
    """The loop. Components (all given, none built here):

    ``runner``: ``train_step(batches, policy, step, loss_factor) -> StepMetrics`` (with ``.verdict``)
    and ``eval_step(batches) -> dict``; ``train_batches(consumed_samples)``: the training
    micro-batch iterator from a data position; ``valid_batches()``: a fresh validation iterator, or
    None; ``checkpoints``: ``due(step, stopping)``, ``save(state) -> path``, ``restore_last(state)``,
    ``poll()`` / ``finish()`` / ``abandon()`` (a background save: commit when written / wait / drop);
    ``callbacks``: the hooks; ``policy``: the update rules; ``stop_signals``: the pre-emption flag
    (None: not watched); ``faults``: test-only injected faults; ``say``: the main rank's console.
    """

    def __init__(self, *, settings: LoopSettings, runner, train_batches: Callable[[int], Iterator],
                 valid_batches: Optional[Callable[[], Iterator]], state: TrainState, checkpoints,
                 callbacks: Callback, policy: UpdatePolicy, stop_signals: Optional[StopSignals] = None,
                 faults: Optional[FaultInjector] = None, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.runner = runner
        self.make_train_batches = train_batches
        self.valid_batches = valid_batches
        self.state = state
        self.checkpoints = checkpoints
        self.callbacks = callbacks
        self.policy = policy
        self.stop_signals = stop_signals
        self.faults = faults
        self.say = say
        self.stopped_by: Optional[str] = None  # the signal that stopped fit(), if any
        self.train_batches = train_batches(state.consumed_train_samples)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        s = self.settings
        steps_this_run = 0
        reason = "error"
        try:
            while self.state.step < s.max_steps:
                step_number = self.state.step + 1
                self.callbacks.on_step_begin(self.state)
                loss_factor = 1.0
                if self.faults is not None:
                    self.faults.before_step(step_number)
                    loss_factor = self.faults.loss_factor(step_number)
                step = self.runner.train_step(self.train_batches, self.policy, step_number, loss_factor)
                self.state.step = step_number
                self.state.consumed_train_samples += s.global_batch_size
                steps_this_run += 1
                self.count(step.verdict)
                rolled_back = step.verdict is Verdict.ROLLBACK and self.roll_back()
                if not rolled_back:
                    self.callbacks.on_step(self.state, step)
                if self.policy.too_many_skips:
                    raise TooManySkippedSteps(
                        f"{self.policy.consecutive_skips} updates in a row were skipped (last: {step.verdict.value}) "
                        f"at step {step_number}, train.max_skipped_steps={self.policy.max_skipped_steps}: the run "
                        f"stops without saving, so its latest checkpoint is the last good one. Look at the loss and "
                        f"grad norm before the skips; resume with checkpoint.resume=auto (lower optim.lr, or skip data "
                        f"with a rollback: train.spike.action=rollback).")
                if rolled_back:
                    continue
                self.checkpoints.poll()  # a background save commits once every rank has written it
                if self.valid_batches is not None and self.state.step % s.eval_interval == 0:
                    self.callbacks.on_eval(self.state, self.evaluate())
                exiting = s.exit_interval is not None and steps_this_run >= s.exit_interval
                if self.stop_signals is not None:
                    self.stopped_by = self.stop_signals.agreed()
                    exiting = exiting or self.stopped_by is not None
                last = exiting or self.state.step == s.max_steps
                if self.checkpoints.due(self.state.step, exiting):
                    path = self.checkpoints.save(self.state)
                    self.say(f"saved checkpoint {path}")
                    self.callbacks.on_save(self.state, path, last)
                if exiting:
                    reason = self.stopped_by or "exit_interval"
                    self.say(self.exit_message())
                    break
            else:
                reason = "max_steps"
            self.checkpoints.finish()  # the background save of the last step, committed before exit
        except BaseException:
            self.checkpoints.abandon()  # never committed: latest stays the previous checkpoint
            raise
        finally:
            self.callbacks.on_stop(self.state, reason)
        return self.state

    def count(self, verdict: Verdict) -> None:
        """The run's counters and the policy's consecutive-skip count for the step just run."""
        self.policy.settle(verdict)
        if not verdict.applied:
            self.state.skipped_iterations += 1
        if verdict is Verdict.SKIP_NONFINITE:
            self.state.nan_iterations += 1
        if self.policy.spike_seen:
            self.state.loss_spikes += 1
            self.say(f"loss spike at step {self.state.step}: {verdict.value}")

    def roll_back(self) -> bool:
        """Continue from the last checkpoint, past the data of the spike window; False (the step
        counts as skipped) when there is no checkpoint yet."""
        restored = self.checkpoints.restore_last(self.state)
        if restored is None:
            self.say(f"loss spike at step {self.state.step}: no checkpoint to roll back to yet; the step counts as "
                     f"skipped (under ZeRO 2/3 its update was applied)")
            return False
        skipped = self.state.step - restored.step
        restored.rollbacks += 1
        self.state = restored
        self.train_batches = self.make_train_batches(restored.consumed_train_samples)
        self.say(f"rolled back to the checkpoint of step {restored.step}; the data of the {skipped} steps since "
                 f"is skipped (data position {restored.consumed_train_samples} samples)")
        self.callbacks.on_restore(self.state)
        return True

    def exit_message(self) -> str:
        if self.stopped_by is not None:
            saved = "checkpoint saved" if self.checkpoints.due(self.state.step, True) else \
                "NO checkpoint: checkpoint.save=false"
            return (f"stopped by {self.stopped_by} at step {self.state.step} ({saved}); exit code "
                    f"{PREEMPTED_EXIT_CODE}, resume with checkpoint.resume=auto")
        return (f"exit_interval={self.settings.exit_interval} reached at step {self.state.step}; "
                f"resume with checkpoint.resume=auto")

    def evaluate(self) -> Dict[str, float]:
        # Validation reads the same samples every time (from sample 0), so it never moves the
        # training data position and resumed runs evaluate on identical batches.
        batches = self.valid_batches()
        n = self.settings.eval_iters
        total: Dict[str, float] = {}
        for _ in range(n):
            for k, v in self.runner.eval_step(batches).items():
                total[k] = total.get(k, 0.0) + v / n
        return {valid_key(k): v for k, v in total.items()}


# ---------------------------------------------------------------------- building a run
@dataclass
class TrainingRun:
    """A built trainer and what must be closed after it."""

    trainer: Trainer
    cfg: Config
    derived: Derived
    run_logger: object
    extra: dict = field(default_factory=dict)  # the built pieces, for benchmarks (engine, env, ...)

    def close(self, status: str = "FINISHED", keep_process_group: bool = False) -> None:
        from mod_train.distributed.init import shutdown

        # RUNNING: the MLflow run stays open; the resumed invocation continues it.
        self.run_logger.close(status)
        shutdown(keep_process_group, failed=status == "FAILED")


def build_run(cfg: Config, derived: Derived, stop_signals: Optional[StopSignals] = None) -> TrainingRun:
    """Process group, model, engine, resume, data, run logger and callbacks for ``cfg`` (validated
    into ``derived``), wired into a Trainer."""
    from pathlib import Path

    import torch
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from mod_train.callbacks.checkpointing import Checkpointing
    from mod_train.callbacks.flops import FlopsAccount
    from mod_train.callbacks.loss_plot import LossPlot
    from mod_train.callbacks.metrics_logging import MetricsLogging
    from mod_train.callbacks.routing_heatmap import RoutingHeatmap, expert_labels
    from mod_train.callbacks.watchdog import StepWatchdog
    from mod_train.checkpoint.resume import ResumePlan
    from mod_train.checkpoint.state import Checkpointer, layout_of
    from mod_train.config.load import to_plain_dict
    from mod_train.data.datasets import MicroBatches, build_datasets
    from mod_train.data.tokenizer import load_tokenizer
    from mod_train.distributed.init import init_distributed, seed_everything
    from mod_train.engine.deepspeed_setup import build_engine
    from mod_train.engine.step import ModelChunks, StepRunner
    from mod_train.model.aux_losses import AuxLossRecorder
    from mod_train.model.build import build_model_chunks, count_parameters
    from mod_train.model.flops import noop_columns, peak_tflops_for, train_flops_per_token
    from mod_train.model.fusions import as_params as fusion_tags
    from mod_train.model.fusions import describe as describe_fusions
    from mod_train.tracking.run_logger import open_run_logger

    env = init_distributed(cfg.parallel, cfg.train.seed)
    if stop_signals is not None:
        stop_signals.attach_group()

    def say(msg: str) -> None:
        if env.is_main:
            print(msg, flush=True)

    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, mock_vocab_size=cfg.model.vocab_size if cfg.data.mock else None)
    seed_everything(cfg.train.seed)
    chunks = build_model_chunks(cfg, derived)
    say(describe_fusions(derived.fusions))  # decided once in validate (model/fusions.py)
    aux = AuxLossRecorder(chunks)

    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    checkpointer = Checkpointer(ckpt_root, cfg.checkpoint.keep_last, env.rank, layout=layout_of(cfg, derived),
                                deepspeed_files=cfg.checkpoint.deepspeed_files, async_save=cfg.checkpoint.async_save,
                                write_delay_s=cfg.train.inject.checkpoint_write_delay_s)
    plan = ResumePlan.of(checkpointer, cfg.checkpoint.resume, cfg.checkpoint.init_from, say)
    plan.load_weights(chunks)
    engine, scheduler = build_engine(cfg, derived, ModelChunks(chunks), chunks)
    runner = StepRunner(engine, cfg, derived, aux)
    state = plan.load_state(engine, scheduler)

    datasets = build_datasets(cfg, derived, tokenizer, run_dir)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = cfg.parallel.micro_batch_size

    def train_batches(consumed: int):
        return MicroBatches(datasets.train, consumed, mbs, dp_rank, dp_size, env.device)

    valid_batches = None
    if datasets.valid is not None:
        def valid_batches():
            return MicroBatches(datasets.valid, 0, mbs, dp_rank, dp_size, env.device)

    # FLOPs per token as Megatron-LM counts them (flops.py); integrated MoDE: as if no routing slot
    # went to a no-op (the tag and the upper bound; steps are charged at the measured share).
    m, d = cfg.model, derived
    flops_per_token = train_flops_per_token(m, d.ffn_hidden_size, d.padded_vocab_size, d.mod_layers,
                                            d.mod_capacities, d.moe_layers)
    measured = None
    if noop_columns(m):
        from mod_train.model.mode import drain_noop_share

        def measured() -> Optional[float]:
            share = drain_noop_share(engine.module, m.num_layers, env.device)
            return None if share is None else train_flops_per_token(
                m, d.ffn_hidden_size, d.padded_vocab_size, d.mod_layers, d.mod_capacities, d.moe_layers,
                noop_fraction=share)

    tokens_per_step = d.global_batch_size * m.seq_length
    flops = FlopsAccount(flops_per_token, tokens_per_step, state, measured)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    p = cfg.parallel
    family = {(False, False): "dense", (True, False): "mod", (False, True): "moe",
              (True, True): "mode"}[(m.mod.enabled, m.moe.num_experts > 0)]
    run_logger = open_run_logger(
        cfg.tracking, run_dir, is_main=env.is_main, max_steps=cfg.train.max_steps, run_id=state.mlflow_run_id,
        config=to_plain_dict(cfg), resolved_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        # The fusion decisions are tags, not params: they follow the machine, which a resumed run
        # may change (MLflow params cannot change).
        tags={"model.family": family, "layout": f"tp{p.tp}_pp{p.pp}_ep{p.ep}_dp{d.dp}_zero{p.zero_stage}",
              "flops_per_token": f"{flops_per_token:.6g}", "world_size": str(env.world_size),
              **fusion_tags(d.fusions)},
        artifacts=[cfg.data.tokenizer_model] if cfg.data.tokenizer_model else [], first_step=state.step + 1)

    callbacks = [flops, MetricsLogging(run_logger, flops, log_interval=cfg.train.log_interval,
                                       max_steps=cfg.train.max_steps, world_size=env.world_size,
                                       global_batch_size=d.global_batch_size, tokens_per_step=tokens_per_step,
                                       peak_tflops=cfg.train.peak_tflops or peak_tflops_for(device_name),
                                       spikes_counted=cfg.train.spike.action != "off")]
    if m.moe.num_experts > 0:
        callbacks.append(RoutingHeatmap(engine.module, m.num_layers, expert_labels(m.moe.num_experts, noop_columns(m)),
                                        env.device, run_dir, run_logger, env.is_main))
    if m.mod.enabled and m.mod.capacity_schedule.steps > 0:  # before the step's forward: k per phase
        from mod_train.callbacks.capacity_schedule import CapacityScheduleCallback

        callbacks.insert(0, CapacityScheduleCallback([engine.module], m.mod.capacity_schedule))
    if cfg.eval.lm_eval.interval > 0 and cfg.eval.lm_eval.tasks:  # lm-evaluation-harness on rank 0
        from mod_train.callbacks.lm_eval import LmEvalCallback

        lm = cfg.eval.lm_eval
        callbacks.append(LmEvalCallback(engine.module, cfg.data.tokenizer_model, m.seq_length, lm.tasks,
                                        lm.interval, lm.limit, run_logger, env.is_main))
    loss_plot = LossPlot(run_dir, run_logger, env.is_main)
    callbacks.append(loss_plot)
    if cfg.train.step_timeout_s is not None:
        callbacks.append(StepWatchdog(cfg.train.step_timeout_s, run_dir, env.rank))
    checkpoints = Checkpointing(checkpointer, engine, enabled=cfg.checkpoint.save,
                                interval=cfg.checkpoint.save_interval, max_steps=cfg.train.max_steps,
                                config=to_plain_dict(cfg), flops=flops, run_id=lambda: run_logger.run_id)
    faults = FaultInjector(cfg.train.inject, env.rank)
    trainer = Trainer(settings=loop_settings(cfg, derived), runner=runner, train_batches=train_batches,
                      valid_batches=valid_batches, state=state, checkpoints=checkpoints,
                      callbacks=Callbacks(callbacks), policy=update_policy(cfg, faults), stop_signals=stop_signals,
                      faults=faults, say=say)
    extra = {"engine": engine, "env": env, "num_params_local": count_parameters(chunks), "loss_plot": loss_plot}
    return TrainingRun(trainer, cfg, derived, run_logger, extra)


def run_until_stopped(cfg: Config, keep_process_group: bool = False, derived: Optional[Derived] = None,
                      stop_signals: Optional[StopSignals] = None) -> Tuple[TrainState, Optional[str]]:
    """Train (or resume) until max_steps, exit_interval or SIGUSR1/SIGTERM (with a checkpoint):
    (TrainState, the stopping signal's name or None). ``derived``: ``validate(cfg)`` when the caller
    already validated; ``stop_signals``: installed early by the caller (else installed here)."""
    derived = derived if derived is not None else validate(cfg)
    signals = stop_signals or StopSignals().install()
    try:
        run = build_run(cfg, derived, signals)
        try:
            state = run.trainer.fit()
        except BaseException:
            run.close("FAILED", keep_process_group)
            raise
        # A run stopped by exit_interval or a signal is not over: its MLflow run stays open for the resume.
        run.close("FINISHED" if state.step >= cfg.train.max_steps else "RUNNING", keep_process_group)
        return state, run.trainer.stopped_by
    finally:
        signals.restore()


def run(cfg: Config, keep_process_group: bool = False) -> TrainState:
    """Train (or resume) until max_steps or exit_interval; returns the final TrainState."""
    return run_until_stopped(cfg, keep_process_group)[0]
