"""`mod-train`: the Hydra entry point and the loop that wires config, model, engine, data,
checkpoints and tracking together. Model and parallel logic live in their own modules.

    torchrun --nproc-per-node 2 -m mod_train.train model=tiny train.max_steps=50
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import hydra
from omegaconf import DictConfig

from mod_train.config.load import conf_dir, to_config, to_plain_dict
from mod_train.config.schema import Config, register_configs
from mod_train.config.validate import ConfigError, Derived, validate

log = logging.getLogger("mod_train")

# Config keys that may change when a stopped run is resumed (logged as tags, not params).
PER_INVOCATION_KEYS = ("train.exit_interval", "checkpoint.resume")


class Trainer:
    """Holds the pieces of one run; ``fit()`` runs the loop until max_steps or exit_interval."""

    def __init__(self, cfg: Config):
        import torch

        from mod_train.checkpoint.state import Checkpointer, TrainState
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

        self.tokenizer = load_tokenizer(cfg.data.tokenizer_model)
        seed_everything(cfg.train.seed)
        chunks = build_model_chunks(cfg, self.derived)
        self.num_params_local = count_parameters(chunks)
        self.aux = AuxLossRecorder(chunks)
        self.engine, self.scheduler = build_engine(cfg, self.derived, ModelChunks(chunks), chunks)
        self.runner = StepRunner(self.engine, cfg, self.derived, self.aux)

        ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpointer = Checkpointer(ckpt_root, cfg.checkpoint.keep_last, self.env.rank)
        resume_from = self.checkpointer.resolve(cfg.checkpoint.resume)
        self.state = TrainState()
        if resume_from is not None:
            self.state = self.checkpointer.load(self.engine, resume_from)
            self._info(f"resumed from {resume_from} at step {self.state.step}")

        datasets = build_datasets(cfg, self.derived, self.tokenizer, self.run_dir)
        self.valid_dataset = datasets.valid
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._micro_batches = MicroBatches
        self.train_batches = MicroBatches(datasets.train, self.state.consumed_train_samples,
                                          cfg.parallel.micro_batch_size, self.dp_rank, self.dp_size, self.env.device)

        self.flops_per_token = train_flops_per_token(
            cfg.model, self.derived.ffn_hidden_size, self.derived.padded_vocab_size, self.derived.mod_layers,
            self.derived.mod_capacities, self.derived.moe_layers)
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak_tflops = cfg.train.peak_tflops or peak_tflops_for(device_name)
        self.tracker, self.metrics_file = self._start_tracking()

    # ------------------------------------------------------------------ tracking
    def _info(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def _start_tracking(self):
        from mod_train.tracking.metrics_jsonl import MetricsJsonl
        from mod_train.tracking import MlflowTracker, flatten_config

        t = self.cfg.tracking
        tracker = MlflowTracker(tracking_uri=t.tracking_uri, experiment=t.experiment,
                                run_name=t.run_name or Path(self.cfg.train.run_dir).name,
                                run_id=self.state.mlflow_run_id, enabled=t.enabled and self.env.is_main)
        tracker.start()
        if self.env.is_main:
            params = flatten_config(to_plain_dict(self.cfg))
            # Keys that differ between the invocations of one run (stop, then resume) are tags:
            # MLflow params are immutable.
            per_invocation = {k: params.pop(k) for k in PER_INVOCATION_KEYS if k in params}
            tracker.log_params(params)
            tracker.set_tags({f"invocation.{k}": v for k, v in per_invocation.items()})
            tracker.set_tags({
                "model.family": self._family(),
                "layout": f"tp{self.cfg.parallel.tp}_pp{self.cfg.parallel.pp}_ep{self.cfg.parallel.ep}_dp{self.derived.dp}_zero{self.cfg.parallel.zero_stage}",
                "flops_per_token": f"{self.flops_per_token:.6g}",
                "world_size": str(self.env.world_size),
            })
            tracker.log_artifact(self.cfg.data.tokenizer_model)
            resolved = self.run_dir / "resolved_config.yaml"
            from omegaconf import OmegaConf

            resolved.write_text(OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
            tracker.log_artifact(str(resolved))
        metrics = MetricsJsonl(self.run_dir / "metrics.jsonl") if self.env.is_main else None
        return tracker, metrics

    def _family(self) -> str:
        mod = self.cfg.model.mod.enabled
        moe = self.cfg.model.moe.num_experts > 0
        return {(False, False): "dense", (True, False): "mod", (False, True): "moe", (True, True): "mode"}[(mod, moe)]

    def _log(self, step: int, metrics: Dict[str, float]) -> None:
        from mod_train.tracking.log_line import format_log_line

        if not self.env.is_main:
            return
        print(format_log_line(step, self.cfg.train.max_steps, metrics), flush=True)
        self.metrics_file.append(step, metrics)
        self.tracker.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ loop
    def fit(self):
        cfg, d = self.cfg, self.derived
        tokens_per_step = d.global_batch_size * cfg.model.seq_length
        steps_this_run = 0
        logged_at = 0  # steps_this_run at the last log line, for the time per step
        t_last = time.time()
        while self.state.step < cfg.train.max_steps:
            metrics = self.runner.train_step(self.train_batches)
            self.state.step += 1
            self.state.consumed_train_samples += d.global_batch_size
            steps_this_run += 1
            if self.state.step % cfg.train.log_interval == 0 or self.state.step == cfg.train.max_steps:
                elapsed = (time.time() - t_last) / max(steps_this_run - logged_at, 1)
                logged_at, t_last = steps_this_run, time.time()
                metrics.update(self._throughput(elapsed, tokens_per_step))
                self._log(self.state.step, metrics)
            if self.valid_dataset is not None and self.state.step % cfg.train.eval_interval == 0:
                self._log(self.state.step, self.evaluate())
            exiting = cfg.train.exit_interval is not None and steps_this_run >= cfg.train.exit_interval
            if (self.state.step % cfg.checkpoint.save_interval == 0 or self.state.step == cfg.train.max_steps
                    or exiting):
                # The run id is known late if the tracking server was down at start.
                self.state.mlflow_run_id = self.tracker.run_id
                path = self.checkpointer.save(self.engine, self.state, {"config": to_plain_dict(cfg)})
                self._info(f"saved checkpoint {path}")
            if exiting:
                self._info(f"exit_interval={cfg.train.exit_interval} reached at step {self.state.step}; "
                           f"resume with checkpoint.resume=auto")
                break
        return self.state

    def _throughput(self, seconds_per_step: float, tokens_per_step: int) -> Dict[str, float]:
        tokens_per_s = tokens_per_step / max(seconds_per_step, 1e-9)
        tflops_per_device = self.flops_per_token * tokens_per_s / self.env.world_size / 1e12
        out = {"elapsed time per iteration (ms)": seconds_per_step * 1000.0, "tokens/s": tokens_per_s,
               "TFLOP/s/device": tflops_per_device, "consumed samples": float(self.state.consumed_train_samples),
               "global batch size": float(self.derived.global_batch_size)}
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

        if status != "RUNNING":
            self.tracker.end(status)
        else:
            self.tracker.flush()  # stays open in MLflow; the resumed invocation continues it
        if self.metrics_file is not None:
            self.metrics_file.close()
        shutdown(keep_process_group)


def run(cfg: Config, keep_process_group: bool = False):
    """Train (or resume) until max_steps or exit_interval; returns the final TrainState."""
    trainer = Trainer(cfg)
    try:
        state = trainer.fit()
    except BaseException:
        trainer.close("FAILED", keep_process_group)
        raise
    # A run stopped by exit_interval is not over: its MLflow run stays open for the resume.
    trainer.close("FINISHED" if state.step >= cfg.train.max_steps else "RUNNING", keep_process_group)
    return state


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        validate(cfg)
    except ConfigError as e:
        print(f"mod-train: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    run(cfg)


def main() -> None:
    register_configs()
    logging.basicConfig(level=os.environ.get("MOD_TRAIN_LOGLEVEL", "WARNING"))
    _hydra_main()


if __name__ == "__main__":
    main()
