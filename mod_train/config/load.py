"""Compose the Hydra config outside of ``@hydra.main`` (tests, tools) and turn it into typed objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mod_train.config.schema import Config, register_configs
from mod_train.config.validate import ConfigError


def conf_dir() -> Path:
    """The directory of the Hydra config groups (``conf/`` at the repository root)."""
    env = os.environ.get("MOD_TRAIN_CONF")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with command-line style overrides, as ``mod-train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hydra.errors import ConfigCompositionException, OverrideParseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except OverrideParseException as e:  # an override the grammar cannot read, e.g. `key=[`
        raise ConfigError(f"cannot parse the override {e.override!r}: {e}") from e
    except ConfigCompositionException as e:
        # An unknown key, a wrong type or a value outside a Choice: OmegaConf's reason (allowed
        # values, full key) is in the cause; say it in one ConfigError the CLIs print cleanly.
        cause = [line.strip() for line in str(e.__cause__ or "").splitlines()[:2] if line.strip()]
        raise ConfigError(f"{e}: {'; '.join(cause)}" if cause else str(e)) from e


def to_config(cfg: DictConfig) -> Config:
    """A typed ``Config`` (dataclasses) from a composed DictConfig; interpolations resolved."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


def to_plain_dict(cfg: Config | DictConfig) -> dict:
    """The resolved config as plain Python containers (for MLflow params, checkpoint metadata)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    # enum_to_str: Choice members become their names, which are their values (see schema.Choice).
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]
