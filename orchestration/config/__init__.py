"""The typed run configuration: schema, validation and loading (see each module)."""

from orchestration.config.loading import (
    load_data_mix,
    load_model_config,
    load_run_config,
    load_yaml,
    register_configs,
    to_dict,
    to_run_config,
)
from orchestration.config.schema import (
    CheckpointConfig,
    DataConfig,
    Fp8Config,
    FusionConfig,
    LoggingConfig,
    ModelConfig,
    MupConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    RuntimeConfig,
    SourceConfig,
    SpikeConfig,
    StageConfig,
    TrainConfig,
)
from orchestration.config.validate import ConfigError, padded_vocab_size, validate

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "Fp8Config", "FusionConfig", "LoggingConfig",
    "ModelConfig", "MupConfig", "OptimConfig", "ParallelConfig", "RunConfig", "RuntimeConfig", "SourceConfig", "SpikeConfig",
    "StageConfig", "TrainConfig", "load_data_mix", "load_model_config", "load_run_config",
    "load_yaml", "padded_vocab_size", "register_configs", "to_dict", "to_run_config", "validate",
]
