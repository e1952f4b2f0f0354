"""Read a config from YAML/JSON (unknown keys are errors) and write the resolved config of a run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import ConfigError
from .adaptive_moe_config import FIELDS, AdaptiveMoEModelConfig
from .presets import PRESETS


def load_config_file(path: str | Path) -> dict:
    """Field values from a .yaml/.yml/.json file. A `preset:` key names a preset to start from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"file {path} does not exist; give a preset ({', '.join(PRESETS)}) "
                          "or the path of a .yaml/.json file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("config", f"{path} is not valid {path.suffix.lstrip('.').upper()}: {exc}".splitlines()[0])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of field: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    preset = data.pop("preset", "default")
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r} in {path}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError("config", f"unknown key(s) {', '.join(unknown)} in {path}; allowed keys are the "
                          "fields of the config sections (blueberry/configs/model.py, data.py, optim.py, training.py)")
    if "adamw_betas" in data:
        data["adamw_betas"] = tuple(data["adamw_betas"])
    return {**PRESETS[preset], **data}


def save_config(config: AdaptiveMoEModelConfig, path: str | Path) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")
