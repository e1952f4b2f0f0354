"""Configuration: one small dataclass per concern (model, data, optimizer, training) composed by
`AdaptiveMoEModelConfig` with hardware-aware defaults; named presets; file loading; validation."""

from .adaptive_moe_config import AdaptiveMoEModelConfig, model_config_of
from .data import DataConfig
from .model import ModelConfig
from .optim import OptimizerConfig
from .training import TrainingConfig
from .presets import (
    PRESETS,
    get_config,
    get_cpu_config,
    get_default_config,
    get_development_config,
    get_h100_config,
    get_production_config,
    get_rtx4090_config,
    get_rtx5090_config,
)
from .files import load_config_file, save_config

__all__ = [
    "AdaptiveMoEModelConfig",
    "model_config_of",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TrainingConfig",
    "PRESETS",
    "get_config",
    "get_cpu_config",
    "get_default_config",
    "get_development_config",
    "get_h100_config",
    "get_production_config",
    "get_rtx4090_config",
    "get_rtx5090_config",
    "load_config_file",
    "save_config",
]
