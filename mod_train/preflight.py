"""Start-of-job checks that look outside the config, after ``validate`` and before any process group.

In this order, so that a refused job writes nothing into a run directory it does not own:

1. the checkpoint to resume (or ``init_from``) fits this run's model (every rank; read-only);
2. main rank only: take the run-directory lock (one job per run directory);
3. the checkpoint directory is writable and has room for one more checkpoint;
4. leftovers of interrupted saves and prunes are removed (safe: we own the directory);
5. the composed config goes to ``<run_dir>/.hydra/`` (Hydra itself writes nothing there, so a
   command that fails validation leaves an existing run directory untouched).

Every failure is a ``PreflightError`` (a ``ConfigError``): the entry points print it as they print
configuration errors and exit with code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from mod_train.config.validate import ConfigError, Derived

HYDRA_DIR = ".hydra"


class PreflightError(ConfigError):
    """A job that cannot start (checkpoint, lock or storage); the message says what to change."""


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.run_dir) / "checkpoints"


def check_checkpoint_fits(cfg) -> Optional[Path]:
    """The checkpoint that will be resumed (None: fresh run); PreflightError if it (or init_from) has
    another model shape, naming the differing keys."""
    from mod_train.checkpoint.compatibility import IncompatibleCheckpoint, check_resume_and_init
    from mod_train.config.load import to_plain_dict

    try:
        return check_resume_and_init(to_plain_dict(cfg), checkpoint_root(cfg), cfg.checkpoint.resume,
                                     cfg.checkpoint.init_from)
    except IncompatibleCheckpoint as e:
        raise PreflightError(str(e)) from None
    except ValueError as e:  # a resume path that is not a checkpoint (layout.resolve_resume names the key)
        raise PreflightError(str(e)) from None


def write_composed_config(cfg, run_dir: Path, overrides: Optional[Sequence[str]] = None) -> None:
    """``<run_dir>/.hydra/config.yaml`` (+ ``overrides.yaml``), as Hydra's output_subdir used to."""
    from omegaconf import OmegaConf

    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ImportError, ValueError):
            overrides = []
    out = run_dir / HYDRA_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def preflight(cfg, derived: Derived, *, main_rank: Optional[bool] = None,
              overrides: Optional[Sequence[str]] = None):
    """Run the checks above; returns the held ``RunLock`` (main rank) or None. Released at exit."""
    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.checkpoint.storage import StorageError, check_storage, estimate_checkpoint_bytes
    from mod_train.run_lock import RunDirLocked, RunLock

    if main_rank is None:
        main_rank = int(os.environ.get("RANK", "0")) == 0
    if cfg.tracking.tensorboard:  # the optional sink's package, named with its extra (every rank)
        from mod_train.tracking.sinks import TensorBoardMissing, check_tensorboard

        try:
            check_tensorboard()
        except TensorBoardMissing as e:
            raise PreflightError(str(e)) from None
    check_checkpoint_fits(cfg)
    if not main_rank:
        return None
    run_dir = Path(cfg.train.run_dir)
    try:
        lock = RunLock(run_dir).acquire()
    except RunDirLocked as e:
        raise PreflightError(str(e)) from None
    except OSError as e:
        raise PreflightError(f"train.run_dir: cannot create or lock {run_dir}: {e.strerror or e}.") from None
    try:
        if cfg.checkpoint.save:
            root = checkpoint_root(cfg)
            check_storage(root, estimate_checkpoint_bytes(cfg, derived))
            CheckpointDir(root).clean_stale_staging()
        write_composed_config(cfg, run_dir, overrides)
    except StorageError as e:
        lock.release()
        raise PreflightError(e.strerror or str(e)) from None
    except OSError as e:
        lock.release()
        raise PreflightError(f"train.run_dir: cannot write into {run_dir}: {e.strerror or e}.") from None
    return lock
