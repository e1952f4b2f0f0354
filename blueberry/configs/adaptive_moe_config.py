"""`AdaptiveMoEModelConfig`: a run's settings, composed of one small dataclass per concern.

    config.model      ModelConfig      the architecture (all the model code sees)
    config.data       DataConfig       sources, tokenizer, split, windows
    config.optim      OptimizerConfig  optimizer, learning rates, schedule
    config.training   TrainingConfig   batch, length, evaluation, checkpoints, device, precision, engine

The seed's flat spelling still works: `AdaptiveMoEModelConfig(d_model=256, lr=0.01)` sends each value
to its section, and `config.d_model` reads it from there. A field left None is "auto": it is filled
from the capabilities of the chosen device (`_hardware_defaults`) or, for the learning rate and
warm-up, from the recipe (`OptimizerConfig.resolve`), and its name recorded in `auto_fields`. A value
the user set is never changed. The few fields a run itself settles after construction (the vocabulary
the tokenizer needs, the batch that fits the GPU, the run directory) change only through `derive`,
which records them in `derived_fields`.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..system import Capabilities, detect_capabilities
from .fields import parse_duration
from .data import DataConfig
from .model import ModelConfig
from .optim import OptimizerConfig
from .training import TrainingConfig

SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimizerConfig,
                             "training": TrainingConfig}
FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
SECTION_OF: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
# Fields with a plain default in their dataclass that the device's recipe sets when the user does not.
DEVICE_CHOSEN = ("model_type", "qk_norm", "weight_decay", "ensemble", "grad_accum_steps", "activation_checkpointing")
# Fields a run settles after the config is built, and only through `derive`.
DERIVED_FIELDS = ("vocab_size", "batch_size", "grad_accum_steps", "out_dir", "use_fp8", "activation_checkpointing",
                  # the plan of a run with a time budget (training.budget): its length and, when left to it, its size
                  "max_steps", "warmup_steps", "eval_every", "checkpoint_every",
                  "model_type", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
_BOOKKEEPING = ("auto_fields", "derived_fields")


class AdaptiveMoEModelConfig:
    def __init__(self, *, auto_fields=(), derived_fields=(), **values):
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise TypeError(f"AdaptiveMoEModelConfig got unknown field(s): {', '.join(unknown)}")
        if not auto_fields:  # a new config: the device decides what the user left out (_hardware_defaults)
            values = {**dict.fromkeys(DEVICE_CHOSEN), **values}
        for name, cls in SECTIONS.items():
            mine = {k: v for k, v in values.items() if SECTION_OF[k] == name}
            object.__setattr__(self, name, cls(**mine))
        object.__setattr__(self, "auto_fields", tuple(auto_fields))
        object.__setattr__(self, "derived_fields", tuple(derived_fields))
        if not self.auto_fields:  # not yet resolved (a config loaded from a checkpoint keeps its record)
            self._fill_defaults()

    def _fill_defaults(self) -> None:
        auto = []
        for name, value in _hardware_defaults(self.capabilities(), self).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                auto.append(name)
        auto += self.optim.resolve(self.max_steps)
        object.__setattr__(self, "auto_fields", tuple(auto))

    # ---- flat access to the sections' fields ----
    def __getattr__(self, name):
        section = SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    def __setattr__(self, name, value):
        section = SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        setattr(object.__getattribute__(self, section), name, value)

    def derive(self, **values) -> None:
        """Set fields the run settles itself (DERIVED_FIELDS), recording that they were derived."""
        for name, value in values.items():
            if name not in DERIVED_FIELDS:
                raise ValueError(f"{name} is a user setting, not a derived field ({', '.join(DERIVED_FIELDS)})")
            setattr(self, name, value)
        object.__setattr__(self, "derived_fields", tuple(dict.fromkeys(self.derived_fields + tuple(values))))

    def __eq__(self, other) -> bool:
        return isinstance(other, AdaptiveMoEModelConfig) and self.values() == other.values()

    def __repr__(self) -> str:
        return f"AdaptiveMoEModelConfig({', '.join(f'{k}={v!r}' for k, v in self.values().items())})"

    # ---- derived values ----
    def capabilities(self) -> Capabilities:
        return detect_capabilities(self.device)

    @property
    def attention_head_dim(self) -> int:
        return self.model.attention_head_dim

    @property
    def expert_d_ff(self) -> int:
        return self.model.expert_d_ff

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.max_seq_len

    # ---- conversion ----
    def values(self) -> dict:
        """Every field's value, flat (the sections' fields in declaration order)."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_dict(self) -> dict:
        d = self.values()
        d["adamw_betas"] = list(self.adamw_betas)
        d["auto_fields"] = list(self.auto_fields)
        d["derived_fields"] = list(self.derived_fields)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptiveMoEModelConfig":
        d = dict(d)
        d["adamw_betas"] = tuple(d.get("adamw_betas", (0.9, 0.95)))
        d["auto_fields"] = tuple(d.get("auto_fields", ()))
        d["derived_fields"] = tuple(d.get("derived_fields", ()))
        return cls(**d)

    def replace(self, **changes) -> "AdaptiveMoEModelConfig":
        return type(self)(**{**self.values(), **changes}, auto_fields=self.auto_fields,
                          derived_fields=self.derived_fields)

    # ---- validation ----
    def validate(self) -> "AdaptiveMoEModelConfig":
        for name in SECTIONS:
            object.__getattribute__(self, name).validate()
        if self.use_fp8 and not self.capabilities().supports_fp8:
            raise ConfigError("use_fp8", "FP8 was requested but this device has no FP8 support "
                              "(needs CUDA compute capability >= 8.9); drop the request or pass --no-fp8")
        return self


# What `python train.py` picks on a CPU: the winner of benchmarks/recipe_search.py (the dense model beats
# the MoE at equal wall time at this size; docs/LOG.md has every candidate). Also the `cpu` preset.
CPU_RECIPE = dict(model_type="standard", d_model=256, n_layers=4, n_heads=4, max_seq_len=256, batch_size=16,
                  max_steps=900, vocab_size=4096, qk_norm=True, weight_decay=0.2)
# `--ensemble N` of the CPU recipe: each member a little shorter, so that two fit 10 minutes side by side
# (docs/LOG.md, #20). Not the default: the default trains one model (#28).
CPU_ENSEMBLE = dict(max_steps=800)
# The wall budget of a run that is given no --max-steps (README, "The default run").
DEFAULT_TIME_BUDGET = "10m"


def _hardware_defaults(caps: Capabilities, cfg: AdaptiveMoEModelConfig) -> dict:
    """Defaults for fields left None, sized from the device's kind and memory."""
    if caps.is_cuda:
        big = caps.memory_gb >= 40
        # QK-norm and weight decay (the usual 0.1) carry over from the CPU search, unverified on a GPU (docs/LOG.md)
        # 4 micro-batches per optimizer step: the optimizer's share of a step ~10% or less (docs/LOG.md, #31)
        size = dict(ensemble=1, model_type="moe", d_model=768 if big else 512, n_layers=12 if big else 8,
                    n_heads=12 if big else 8, max_seq_len=1024, batch_size=32 if big else 16, max_steps=1250,
                    grad_accum_steps=4, vocab_size=8192, qk_norm=True, weight_decay=0.1)
    else:
        # The CPU recipe: the best held-out bits per byte of one model in 10 minutes on 2 cores (docs/LOG.md, #20)
        size = dict(CPU_RECIPE, ensemble=cfg.ensemble or 1, grad_accum_steps=1)
        if size["ensemble"] > 1 and _is_the_cpu_recipe(cfg):
            size["max_steps"] = CPU_ENSEMBLE["max_steps"]
    # no --max-steps (and one model): the length is planned from the time budget (training.budget)
    budgeted = cfg.max_steps is None and size["ensemble"] == 1
    time_budget = cfg.time_budget or (DEFAULT_TIME_BUDGET if budgeted else None)
    d_model = cfg.d_model or size["d_model"]
    max_steps = cfg.max_steps or size["max_steps"]
    return dict(
        **size,
        n_kv_heads=cfg.n_heads or size["n_heads"],
        d_ff=default_d_ff(d_model, cfg, size["model_type"]),
        **periodic_defaults(max_steps),
        use_amp=caps.autocast_dtype is not None,
        use_fp8=caps.supports_fp8,
        activation_checkpointing="none",  # raised at build time only where the run would not fit otherwise
        # compiling costs tens of seconds once and saves a share of every step: worth it on longer runs
        compile=max_steps >= 150 if not budgeted else _seconds(time_budget) >= 300,
        **({"time_budget": time_budget} if budgeted else {}),
    )


def _seconds(duration: str) -> float:
    try:
        return parse_duration(duration)
    except ValueError:  # validate() names the field
        return 0.0


def default_d_ff(d_model: int, cfg: AdaptiveMoEModelConfig, model_type: str | None = None) -> int:
    """A dense SwiGLU gets the usual 8/3 d_model (an ungated MLP 4 d_model: the same parameters); an expert
    (or an MLP beside experts) 2 d_model."""
    if _has_experts(cfg, model_type or cfg.model_type):
        return 2 * d_model
    return 4 * d_model if cfg.mlp_type != "swiglu" else (8 * d_model // 3 + 63) // 64 * 64


def periodic_defaults(max_steps: int) -> dict:
    """Evaluate about four times a run (at most every 250 steps), checkpoint about twice (at most every 1000)."""
    return dict(eval_every=max(1, min(250, max_steps // 4)), checkpoint_every=max(1, min(1000, max_steps // 2)))


def _is_the_cpu_recipe(cfg: AdaptiveMoEModelConfig) -> bool:
    """Whether the config's model and run length are the CPU recipe's (given or left out)."""
    return cfg.layers is None and all(getattr(cfg, name) in (None, CPU_RECIPE[name]) for name in
                                      ("model_type", "d_model", "n_layers", "max_steps", "batch_size", "max_seq_len"))


def _has_experts(cfg: AdaptiveMoEModelConfig, model_type: str) -> bool:
    if cfg.layers is None:
        return (cfg.model_type or model_type) == "moe"
    return ":moe" in cfg.layers.replace(" ", "")


def model_config_of(config) -> ModelConfig:
    """The ModelConfig of a run's config, a ModelConfig as it is: the seed's model classes and `create_model`
    take either."""
    return config.model if isinstance(config, AdaptiveMoEModelConfig) else config
