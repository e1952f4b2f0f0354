"""`OptimizerConfig`: the optimizer, its learning rates and the schedule.

Learning rate and warm-up are part of the recipe, not facts about the hardware: left unset, the learning
rate comes from the optimizer (`DEFAULT_LR`) and the warm-up from the run's length (`resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .fields import MUON_UPDATE_SCALES, OPTIMIZERS, SCHEDULES, check_choices, check_range, setting

# Learning rate of the main optimizer when the user gives none.
DEFAULT_LR = {"muon": 0.02, "adamw": 3e-3, "lion": 3e-4, "adafactor": 1e-2}


@dataclass
class OptimizerConfig:
    optimizer: str = setting("muon", "muon (hybrid: Muon for hidden matrices, AdamW for the rest), adamw, lion, "
                                     "adafactor", choices=OPTIMIZERS)
    lr: float | None = setting(None, "learning rate of the main optimizer; repeat the flag for a sweep",
                               repeatable=True)
    adamw_lr: float = setting(3e-3, "AdamW learning rate of embeddings, head, norms and router in the Muon hybrid")
    weight_decay: float = setting(0.0, "decoupled weight decay (default: 0.2 on a CPU, 0.1 on a GPU)")
    adamw_betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    muon_momentum: float = setting(0.95, "Muon momentum after its warm-up")
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0")
    momentum_warmup_steps: int = setting(300, "steps over which Muon's momentum rises to --muon-momentum")
    muon_update_scale: str = setting("shape", "shape: max(1, rows/cols)^0.5; adamw: 0.2*sqrt(max(rows, cols))",
                                     choices=MUON_UPDATE_SCALES)
    schedule: str = setting("cosine_warmup", "learning-rate schedule", choices=SCHEDULES)
    warmup_steps: int | None = setting(None, "learning-rate warm-up steps (default: 5% of the run, at most 100)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak")
    decay_fraction: float = setting(0.2, "wsd: final fraction of the steps spent decaying")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)")

    def resolve(self, max_steps: int) -> list[str]:
        """Fill the recipe defaults left unset; returns the names filled."""
        filled = []
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer] if self.optimizer in DEFAULT_LR else 3e-3
            filled.append("lr")
        if self.warmup_steps is None:
            self.warmup_steps = min(100, max(1, max_steps // 20))
            filled.append("warmup_steps")
        return filled

    def validate(self) -> "OptimizerConfig":
        check_choices(self)
        check_range(self, "lr", 0.0, 10.0, lo_open=True)
        check_range(self, "adamw_lr", 0.0, 10.0, lo_open=True)
        check_range(self, "weight_decay", 0.0, 10.0)
        check_range(self, "min_lr_ratio", 0.0, 1.0)
        check_range(self, "decay_fraction", 0.0, 1.0)
        check_range(self, "grad_clip", 0.0, 1e6)
        check_range(self, "muon_momentum", 0.0, 1.0)
        check_range(self, "muon_momentum_start", 0.0, 1.0)
        for name in ("warmup_steps", "momentum_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, f"must be >= 0, got {value!r}")
        return self
