"""Configuration: one dataclass with hardware-aware defaults, named presets, file loading, validation."""

from .adaptive_moe_config import AdaptiveMoEModelConfig
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
