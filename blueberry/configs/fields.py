"""What a config field says about itself: its help text, its command-line flag and its allowed values.

The dataclasses of this package declare every setting with `setting(...)`; the command-line parser,
the YAML/JSON loader and the error messages read that metadata, so a setting is written down once.
The option lists below are the single source of the allowed values (the code that implements each
choice imports them from here).
"""

from __future__ import annotations

import dataclasses
import re

MODEL_TYPES = ("moe", "standard")
MLP_TYPES = ("swiglu", "silu", "relu2")
DATASET_TYPES = ("packed", "text_token", "random_chunk", "document")
OPTIMIZERS = ("muon", "adamw", "lion", "adafactor")
SCHEDULES = ("cosine_warmup", "linear_warmup", "constant", "wsd")
PARALLEL = ("ddp", "fsdp")
MUON_UPDATE_SCALES = ("shape", "adamw")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def parse_trackers(text: str | None) -> list[str]:
    """The tracker names of a --tracker value (ValueError naming an unknown one); "none": no tracker."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} (comma-separated) or none")
    return list(dict.fromkeys(names))


def parse_duration(text) -> float:
    """Seconds of a duration: `45s`, `10m`, `2h`, `1h30m` or a bare number of seconds (ValueError otherwise)."""
    spec = str(text).strip().lower()
    try:
        seconds = float(spec)
    except ValueError:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", spec)
        if not spec or parts is None:
            raise ValueError(f"{text!r} is not a duration: write it as 45s, 10m, 2h or 1h30m") from None
        seconds = sum(float(v) * unit for v, unit in zip(parts.groups(), (3600, 60, 1)) if v)
    if not 0 < seconds < float("inf"):  # NaN fails both
        raise ValueError(f"{text!r}: a time budget must be a positive duration (45s, 10m, 2h)")
    return seconds


def setting(default=None, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
            choices: tuple | None = None, cli: bool = True, repeatable: bool = False, default_factory=None,
            auto_on_off: bool = False):
    """A dataclass field with its metadata. `flag`: the flag's name when it is not the field's;
    `aliases`: older names still accepted; `repeatable`: the flag may be given several times (a sweep);
    `auto_on_off`: a boolean whose flag takes auto|on|off (auto: left to the machine, as if not given)."""
    metadata = {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "cli": cli,
                "repeatable": repeatable, "auto_on_off": auto_on_off}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--seq-len` for max_seq_len, `--fp8` for use_fp8."""
    return "--" + (field.metadata.get("flag") or field.name).replace("_", "-")


# ---- checks shared by the sections' validate() ----
def check_positive(obj, *names: str, optional: bool = False) -> None:
    from ..errors import ConfigError

    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")


def check_choice(obj, name: str, allowed: tuple) -> None:
    from ..errors import ConfigError

    if getattr(obj, name) not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}; got {getattr(obj, name)!r}")


def check_range(obj, name: str, lo: float, hi: float, lo_open: bool = False) -> None:
    from ..errors import ConfigError

    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ConfigError(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")


def check_choices(obj) -> None:
    """Every field that declares `choices` holds one of them."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("choices"):
            check_choice(obj, f.name, f.metadata["choices"])
