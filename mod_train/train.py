"""`mod-train`: the Hydra entry point and the loop that wires config, model, engine, data,
checkpoints and tracking together. Model and parallel logic live in their own modules.

    torchrun --nproc-per-node 2 -m mod_train.train model=tiny train.max_steps=50
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import hydra
from omegaconf import DictConfig

from mod_train.config.load import conf_dir, to_config, to_plain_dict
from mod_train.config.schema import Config, register_configs
from mod_train.config.validate import ConfigError, Derived, validate

log = logging.getLogger("mod_train")

# loss_vs_flops.png is redrawn at checkpoints at most this often (and at the end of each invocation).
LOSS_PLOT_INTERVAL_S = 300.0

# Exit code of an invocation stopped by a signal (a pre-empted job) after its checkpoint was saved.
PREEMPTED_EXIT_CODE = 124
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopSignals:
    """SIGUSR1/SIGTERM (Slurm's pre-emption warning, a job's termination) become a flag; the loop
    stops at the end of the step with a checkpoint. The flag is all-reduced (MAX) every step, so all
    ranks stop at the same step even if the signal reached only some of them. Under NCCL the flag
    travels over a gloo group on the host, so checking it never waits for the GPU."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}
        self._group = None  # the host-side group for the flag (None: the default group is gloo)

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # only sets the flag: safe at any point of the step
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def attach_group(self) -> None:
        """Once, on every rank, after the process group exists."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def agreed(self) -> Optional[str]:
        """The signal name if any rank got one (a collective: every rank calls it every step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)  # host memory
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if not int(flag.item()):
            return None
        return self.received or "a signal on another rank"


_early_signals: Optional[StopSignals] = None  # installed by main() before the heavy imports


class Trainer:
    """Holds the pieces of one run; ``fit()`` runs the loop until max_steps or exit_interval."""

    stop_signals: Optional[StopSignals] = None  # set by run_until_stopped(): stop on SIGUSR1/SIGTERM
    stopped_by: Optional[str] = None  # the signal that stopped fit(), if any

    def __init__(self, cfg: Config):
        import torch

        from mod_train.checkpoint.model_io import load_model, model_dir_of
        from mod_train.checkpoint.state import Checkpointer, TrainState, layout_of
        from mod_train.data.datasets import MicroBatches, build_datasets
        from mod_train.data.tokenizer import load_tokenizer
        from mod_train.distributed.init import init_distributed, seed_everything
        from mod_train.engine.deepspeed_setup import build_engine
        from mod_train.engine.step import ModelChunks, StepRunner
        from mod_train.model.aux_losses import AuxLossRecorder
        from mod_train.model.build import build_model_chunks, count_parameters
        from mod_train.model.flops import peak_tflops_for, train_flops_per_token
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        # All validation happens before any process group exists.
        self.derived: Derived = validate(cfg)
        self.env = init_distributed(cfg.parallel, cfg.train.seed)
        self.run_dir = Path(cfg.train.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        self.tokenizer = load_tokenizer(cfg.data.tokenizer_model,
                                        mock_vocab_size=cfg.model.vocab_size if cfg.data.mock else None)
        seed_everything(cfg.train.seed)
        chunks = build_model_chunks(cfg, self.derived)
        self.num_params_local = count_parameters(chunks)
        self.aux = AuxLossRecorder(chunks)

        ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpointer = Checkpointer(ckpt_root, cfg.checkpoint.keep_last, self.env.rank,
                                         layout=layout_of(cfg, self.derived))
        resume_from = self.checkpointer.resolve(cfg.checkpoint.resume)
        # Weights that do not come from DeepSpeed's files are loaded before the engine exists, so
        # ZeRO's fp32 partitions (and ZeRO-3's parameter shards) are made from them.
        reshard = resume_from is not None and self.checkpointer.needs_reshard(resume_from)
        if reshard:
            self.checkpointer.load_weights_for_reshard(chunks, resume_from)
        elif resume_from is None and cfg.checkpoint.init_from:
            load_model(chunks, model_dir_of(cfg.checkpoint.init_from))
            self._info(f"initialised the model from {cfg.checkpoint.init_from}")
        self.engine, self.scheduler = build_engine(cfg, self.derived, ModelChunks(chunks), chunks)
        self.runner = StepRunner(self.engine, cfg, self.derived, self.aux)

        self.state = TrainState()
        if reshard:
            self.state = self.checkpointer.load_resharded(self.engine, resume_from, self.scheduler)
            self._info(f"resumed from {resume_from} at step {self.state.step}, resharded from layout "
                       f"{self.checkpointer.saved_layout(resume_from)}")
        elif resume_from is not None:
            self.state = self.checkpointer.load(self.engine, resume_from)
            self._info(f"resumed from {resume_from} at step {self.state.step}")

        datasets = build_datasets(cfg, self.derived, self.tokenizer, self.run_dir)
        self.valid_dataset = datasets.valid
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._micro_batches = MicroBatches
        self.train_batches = MicroBatches(datasets.train, self.state.consumed_train_samples,
                                          cfg.parallel.micro_batch_size, self.dp_rank, self.dp_size, self.env.device)

        # FLOPs per token as Megatron-LM counts them (flops.py); integrated MoDE: as if no routing
        # slot went to a no-op (the tag and the upper bound; steps are charged at the measured share).
        self.flops_per_token = train_flops_per_token(
            cfg.model, self.derived.ffn_hidden_size, self.derived.padded_vocab_size, self.derived.mod_layers,
            self.derived.mod_capacities, self.derived.moe_layers)
        self.tokens_per_step = self.derived.global_batch_size * cfg.model.seq_length
        if self.state.total_flops is None:  # a checkpoint from before total FLOPs were kept
            self.state.total_flops = self.flops_per_token * self.tokens_per_step * self.state.step
        self._flops_counted_to_step = self.state.step
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak_tflops = cfg.train.peak_tflops or peak_tflops_for(device_name)
        self.run_logger = self._start_tracking()

    # ------------------------------------------------------------------ tracking
    def _info(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def _start_tracking(self):
        from omegaconf import OmegaConf

        from mod_train.tracking.run_logger import open_run_logger

        p = self.cfg.parallel
        return open_run_logger(
            self.cfg.tracking, self.run_dir, is_main=self.env.is_main, max_steps=self.cfg.train.max_steps,
            run_id=self.state.mlflow_run_id, config=to_plain_dict(self.cfg),
            resolved_yaml=OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
            tags={"model.family": self._family(),
                  "layout": f"tp{p.tp}_pp{p.pp}_ep{p.ep}_dp{self.derived.dp}_zero{p.zero_stage}",
                  "flops_per_token": f"{self.flops_per_token:.6g}",
                  "world_size": str(self.env.world_size)},
            artifacts=[self.cfg.data.tokenizer_model] if self.cfg.data.tokenizer_model else [],
            first_step=self.state.step + 1)

    def _family(self) -> str:
        mod = self.cfg.model.mod.enabled
        moe = self.cfg.model.moe.num_experts > 0
        return {(False, False): "dense", (True, False): "mod", (False, True): "moe", (True, True): "mode"}[(mod, moe)]

    def _log(self, step: int, metrics: Dict[str, float]) -> None:
        self.run_logger.log(step, metrics)  # console, metrics.jsonl, MLflow, ... (rank 0 only)

    _last_plot = float("-inf")

    def _log_loss_plot(self, force: bool = False) -> None:
        """Rank 0: <run_dir>/loss_vs_flops.png from metrics.jsonl, logged as an artifact.

        At checkpoints at most every LOSS_PLOT_INTERVAL_S, always at the end of an invocation
        (``force``). Never stops training; without matplotlib it is skipped (a logged note).
        """
        if not self.env.is_main or (not force and time.monotonic() - self._last_plot < LOSS_PLOT_INTERVAL_S):
            return
        self._last_plot = time.monotonic()
        try:
            from mod_train.tracking.metrics_jsonl import merged_rows
            from mod_train.tracking.plots import plot_loss_vs_flops
            from mod_train.tracking.run_files import LOSS_PLOT, METRICS_FILE

            png = plot_loss_vs_flops(merged_rows(self.run_dir / METRICS_FILE), self.run_dir / LOSS_PLOT)
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            log.warning("loss-vs-FLOPs plot failed: %s", e)
            return
        if png is not None:
            self.run_logger.log_artifact(png)

    # ------------------------------------------------------------------ loop
    def fit(self):
        cfg, d = self.cfg, self.derived
        tokens_per_step = d.global_batch_size * cfg.model.seq_length
        steps_this_run = 0
        # Time spent in train steps since the last log line (evaluation and checkpoints excluded,
        # so the per-step time and throughput describe training alone).
        step_seconds, steps_timed = 0.0, 0
        while self.state.step < cfg.train.max_steps:
            t_step = time.perf_counter()
            step = self.runner.train_step(self.train_batches)
            step_seconds += time.perf_counter() - t_step
            steps_timed += 1
            self.state.step += 1
            self.state.consumed_train_samples += d.global_batch_size
            steps_this_run += 1
            if self.state.step % cfg.train.log_interval == 0 or self.state.step == cfg.train.max_steps:
                t_sync = time.perf_counter()
                # The one host sync, on logged steps only: it also waits for the queued GPU work
                # of the steps since the last log line, so its time counts as step time.
                metrics = step.materialize()
                step_seconds += time.perf_counter() - t_sync
                elapsed = step_seconds / max(steps_timed, 1)
                step_seconds, steps_timed = 0.0, 0
                metrics.update(self._throughput(elapsed, tokens_per_step, self._account_flops()))
                self._log(self.state.step, metrics)
            if self.valid_dataset is not None and self.state.step % cfg.train.eval_interval == 0:
                self._log(self.state.step, self.evaluate())
            exiting = cfg.train.exit_interval is not None and steps_this_run >= cfg.train.exit_interval
            if self.stop_signals is not None:
                self.stopped_by = self.stop_signals.agreed()
                exiting = exiting or self.stopped_by is not None
            if cfg.checkpoint.save and (self.state.step % cfg.checkpoint.save_interval == 0
                                        or self.state.step == cfg.train.max_steps or exiting):
                # The run id is known late if the tracking server was down at start.
                self.state.mlflow_run_id = self.run_logger.run_id
                self._account_flops()  # the saved total covers every step up to this one
                path = self.checkpointer.save(self.engine, self.state, {"config": to_plain_dict(cfg)})
                self._info(f"saved checkpoint {path}")
                self._log_routing_heatmap()
                self._log_loss_plot(force=self.state.step == cfg.train.max_steps or exiting)
            if exiting and self.stopped_by is not None:
                saved = "checkpoint saved" if cfg.checkpoint.save else "NO checkpoint: checkpoint.save=false"
                self._info(f"stopped by {self.stopped_by} at step {self.state.step} ({saved}); "
                           f"exit code {PREEMPTED_EXIT_CODE}, resume with checkpoint.resume=auto")
                break
            if exiting:
                self._info(f"exit_interval={cfg.train.exit_interval} reached at step {self.state.step}; "
                           f"resume with checkpoint.resume=auto")
                break
        return self.state

    def _account_flops(self) -> float:
        """Add the steps since the last call to ``state.total_flops`` and return the training FLOPs
        per token they were charged at: ``flops_per_token``, except for integrated MoDE, where it is
        the count at the no-op share measured over exactly those steps (every training forward pass
        counts its slots, so the share is exact, not the logged step's sample). Called at logged
        steps and before each checkpoint, on every rank (integrated MoDE: one small collective)."""
        from mod_train.model.flops import noop_columns, train_flops_per_token

        flops = self.flops_per_token
        if noop_columns(self.cfg.model):
            from mod_train.model.mode import drain_noop_share

            share = drain_noop_share(self.engine.module, self.cfg.model.num_layers, self.env.device)
            if share is not None:
                d = self.derived
                flops = train_flops_per_token(self.cfg.model, d.ffn_hidden_size, d.padded_vocab_size, d.mod_layers,
                                              d.mod_capacities, d.moe_layers, noop_fraction=share)
        self.state.total_flops += flops * self.tokens_per_step * (self.state.step - self._flops_counted_to_step)
        self._flops_counted_to_step = self.state.step
        return flops

    def _log_routing_heatmap(self) -> None:
        """MoE: a layers x experts heatmap of routing shares since the last checkpoint, gathered
        from all ranks (a collective), written and logged as an MLflow artifact by rank 0."""
        moe = self.cfg.model.moe
        if moe.num_experts == 0:
            return
        from mod_train.model.moe import gather_routing_loads
        from mod_train.tracking.plots import plot_routing_heatmap
        from mod_train.tracking.run_files import ROUTING_DIR, routing_heatmap_name

        from mod_train.model.flops import noop_columns

        noops = noop_columns(self.cfg.model)
        labels = [f"e{i}" for i in range(moe.num_experts)] + (["no-op"] if noops == 1 else
                                                              [f"no-op{j}" for j in range(noops)])
        loads = gather_routing_loads(self.engine.module, self.cfg.model.num_layers, len(labels), self.env.device)
        if self.env.is_main:
            png = plot_routing_heatmap(loads, self.run_dir / ROUTING_DIR / routing_heatmap_name(self.state.step),
                                       labels, title=f"routing shares up to step {self.state.step}")
            if png is not None:
                self.run_logger.log_artifact(png, artifact_path=ROUTING_DIR)

    def _throughput(self, seconds_per_step: float, tokens_per_step: int,
                    flops_per_token: Optional[float] = None) -> Dict[str, float]:
        tokens_per_s = tokens_per_step / max(seconds_per_step, 1e-9)
        flops_per_token = flops_per_token or self.flops_per_token
        tflops_per_device = flops_per_token * tokens_per_s / self.env.world_size / 1e12
        out = {"elapsed time per iteration (ms)": seconds_per_step * 1000.0, "tokens/s": tokens_per_s,
               "TFLOP/s/device": tflops_per_device, "consumed samples": float(self.state.consumed_train_samples),
               "global batch size": float(self.derived.global_batch_size),
               # cumulative training FLOPs of all devices, each step at its measured count (kept in the
               # checkpoint): the x axis of loss_vs_flops.png, comparable across dense/MoD/MoE runs
               "total FLOPs": float(self.state.total_flops)}
        if self.peak_tflops:
            out["MFU"] = tflops_per_device / self.peak_tflops
        import torch

        if torch.cuda.is_available():
            out["memory (GB)"] = torch.cuda.max_memory_allocated() / 1e9
        return out

    def evaluate(self) -> Dict[str, float]:
        # Validation reads the same samples every time (from sample 0), so it never moves the
        # training data position and resumed runs evaluate on identical batches.
        batches = self._micro_batches(self.valid_dataset, 0, self.cfg.parallel.micro_batch_size,
                                      self.dp_rank, self.dp_size, self.env.device)
        total: Dict[str, float] = {}
        for _ in range(self.cfg.train.eval_iters):
            for k, v in self.runner.eval_step(batches).items():
                total[k] = total.get(k, 0.0) + v / self.cfg.train.eval_iters
        return {f"valid {k}": v for k, v in total.items()}

    def close(self, status: str = "FINISHED", keep_process_group: bool = False) -> None:
        from mod_train.distributed.init import shutdown

        # RUNNING: the MLflow run stays open; the resumed invocation continues it.
        self.run_logger.close(status)
        shutdown(keep_process_group, failed=status == "FAILED")


def run(cfg: Config, keep_process_group: bool = False):
    """Train (or resume) until max_steps or exit_interval; returns the final TrainState."""
    return run_until_stopped(cfg, keep_process_group)[0]


def run_until_stopped(cfg: Config, keep_process_group: bool = False):
    """``run()`` that also stops (with a checkpoint) on SIGUSR1/SIGTERM: (TrainState, signal name or None)."""
    global _early_signals
    # Installed before the slow start-up (by main(), even before Hydra), so an early signal is not lost.
    signals, _early_signals = (_early_signals or StopSignals().install()), None
    try:
        trainer = Trainer(cfg)
        signals.attach_group()
        trainer.stop_signals = signals
        try:
            state = trainer.fit()
        except BaseException:
            trainer.close("FAILED", keep_process_group)
            raise
        # A run stopped by exit_interval or a signal is not over: its MLflow run stays open for the resume.
        trainer.close("FINISHED" if state.step >= cfg.train.max_steps else "RUNNING", keep_process_group)
        return state, trainer.stopped_by
    finally:
        signals.restore()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        validate(cfg)
    except ConfigError as e:
        print(f"mod-train: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    # After Hydra set up logging, before the heavy imports: rank 0 prints, dependency noise is
    # counted (MOD_TRAIN_LOGLEVEL / train.log_all_ranks bring it back).
    from mod_train.tracking.console import configure_console

    configure_console(log_all_ranks=cfg.train.log_all_ranks)
    _, stopped_by = run_until_stopped(cfg)
    if stopped_by is not None:
        sys.exit(PREEMPTED_EXIT_CODE)


def main() -> None:
    global _early_signals
    _early_signals = StopSignals().install()
    register_configs()
    logging.basicConfig(level=os.environ.get("MOD_TRAIN_LOGLEVEL", "WARNING"))
    _hydra_main()


if __name__ == "__main__":
    main()
