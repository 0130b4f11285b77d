"""`mod-train`: the Hydra entry point. Compose the config, validate it once, install the stop
signals, run the trainer (mod_train/trainer.py).

    torchrun --nproc-per-node 2 -m mod_train.train model=tiny train.max_steps=50
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from mod_train.config.load import conf_dir, to_config
from mod_train.config.schema import register_configs
from mod_train.config.validate import ConfigError, validate
from mod_train.engine.signals import PREEMPTED_EXIT_CODE, StopSignals
from mod_train.distributed.parent_death import die_with_parent, started_by_torchrun
from mod_train.preflight import preflight

# Exit code of a run stopped because train.max_skipped_steps updates in a row were skipped.
DIVERGED_EXIT_CODE = 3


def main() -> None:
    # Before Hydra and the heavy imports, so a pre-emption signal during start-up is not lost.
    signals = StopSignals().install()
    if started_by_torchrun():
        die_with_parent()  # a rank never outlives torchrun's agent (nor, through it, mod-launch)
    register_configs()
    logging.basicConfig(level=os.environ.get("MOD_TRAIN_LOGLEVEL", "WARNING"))

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def hydra_main(dcfg: DictConfig) -> None:
        try:
            cfg = to_config(dcfg)
            derived = validate(cfg)
            preflight(cfg, derived)  # checkpoint fit, run-directory lock (held until exit), storage
        except ConfigError as e:
            print(f"mod-train: configuration error: {e}", file=sys.stderr)
            sys.exit(2)
        # After Hydra set up logging, before the heavy imports: rank 0 prints, dependency noise is
        # counted (MOD_TRAIN_LOGLEVEL / train.log_all_ranks bring it back).
        from mod_train.tracking.console import configure_console

        configure_console(log_all_ranks=cfg.train.log_all_ranks)
        from mod_train.engine.update_policy import TooManySkippedSteps
        from mod_train.trainer import run_until_stopped

        try:
            _, stopped_by = run_until_stopped(cfg, derived=derived, stop_signals=signals)
        except TooManySkippedSteps as e:
            print(f"mod-train: {e}", file=sys.stderr, flush=True)
            sys.exit(DIVERGED_EXIT_CODE)
        if stopped_by is not None:
            sys.exit(PREEMPTED_EXIT_CODE)

    hydra_main()


if __name__ == "__main__":
    main()
