"""Named presets. Each is a set of explicit field values; anything not named stays hardware-automatic.

`get_config(name, **overrides)` builds the config with user overrides applied at construction, so a
value the user gave is never replaced by an automatic one.
"""

from __future__ import annotations

from ..errors import ConfigError
from .adaptive_moe_config import CPU_RECIPE, AdaptiveMoEModelConfig

# The GPU presets accumulate micro-batches so that the optimizer (Muon's Newton-Schulz) stays about 10% of a
# step or less, with about the tokens of training they had at one micro-batch per step (docs/LOG.md, #31).
PRESETS: dict[str, dict] = {
    # Seconds on a laptop CPU: for smoke tests and iterating on code.
    "dev": dict(model_type="moe", d_model=128, n_layers=2, n_heads=4, max_seq_len=128, batch_size=8,
                num_experts=4, vocab_size=2048, max_steps=200, eval_every=50, eval_batches=5, momentum_warmup_steps=50,
                compile=False),
    # Everything from the hardware (AdaptiveMoEModelConfig()).
    "default": dict(),
    # The CPU-sized model whatever the machine (what `default` picks on a CPU).
    # (its length is left to the device's defaults: planned from the time budget)
    "cpu": dict({k: v for k, v in CPU_RECIPE.items() if k != "max_steps"}, device="cpu"),
    # 24 GB Ada card: FP8 capable.
    "rtx4090": dict(model_type="moe", d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, batch_size=16,
                    grad_accum_steps=6, num_experts=8, vocab_size=32768, max_steps=850),
    # 32 GB Blackwell card.
    "rtx5090": dict(model_type="moe", d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, batch_size=24,
                    grad_accum_steps=4, num_experts=8, vocab_size=32768, max_steps=1250),
    # 80 GB Hopper.
    "h100": dict(model_type="moe", d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, max_seq_len=2048, batch_size=32,
                 grad_accum_steps=3, num_experts=8, vocab_size=32768, max_steps=3300),
    # Multi-GPU with torchrun: FSDP2 and a larger model.
    "production": dict(model_type="moe", d_model=1536, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=2048,
                       batch_size=16, num_experts=16, vocab_size=32768, max_steps=20000, parallel="fsdp"),
}


# The hardware each GPU preset is named for: (memory per GPU in GB, GPUs). `--dry-run` checks the memory
# estimate against it, and a test asserts that each preset fits.
PRESET_HARDWARE: dict[str, tuple[int, int]] = {"rtx4090": (24, 1), "rtx5090": (32, 1), "h100": (80, 1),
                                               "production": (80, 8)}


def get_config(name: str = "default", **overrides) -> AdaptiveMoEModelConfig:
    if name not in PRESETS:
        raise ConfigError("config", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} "
                          "or give a .yaml/.json file")
    preset = dict(PRESETS[name])
    if overrides.get("time_budget") is not None and "max_steps" not in overrides:
        preset.pop("max_steps", None)  # a budget asked for plans the length; a given --max-steps stays steps
    return AdaptiveMoEModelConfig(**{**preset, **overrides})


def get_development_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("dev", **overrides)


def get_default_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("default", **overrides)


def get_cpu_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("cpu", **overrides)


def get_rtx4090_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("rtx4090", **overrides)


def get_rtx5090_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("rtx5090", **overrides)


def get_h100_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("h100", **overrides)


def get_production_config(**overrides) -> AdaptiveMoEModelConfig:
    return get_config("production", **overrides)
