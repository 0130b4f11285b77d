from mod_train.config.schema import (  # noqa: F401
    CheckpointConfig, Config, DataConfig, ModConfig, ModelConfig, MoEConfig, OptimConfig,
    ParallelConfig, TrackingConfig, TrainConfig, register_configs,
)
from mod_train.config.validate import ConfigError, Derived, validate  # noqa: F401
