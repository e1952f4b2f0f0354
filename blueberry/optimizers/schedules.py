"""Learning-rate schedules counted in optimizer steps (after gradient accumulation).

One `LRSchedule` drives every optimizer of a run: each param group's lr is its base lr times
`factor(step)`, where step is the number of optimizer steps already taken. For max_steps = S:
  warmup          factor = (step + 1) / warmup for step < warmup
  cosine_warmup   then cosine from 1 down to min_lr_ratio, reached exactly at step S - 1 (the last one)
  linear_warmup   then linear from 1 down to min_lr_ratio at step S - 1
  wsd             then 1 until the final decay_fraction of steps, linear down to min_lr_ratio at S - 1
  constant        then 1
"""

from __future__ import annotations

import math


from ..configs.fields import SCHEDULES


def lr_factor(step: int, kind: str, max_steps: int, warmup: int, min_ratio: float, decay_fraction: float = 0.2) -> float:
    if step < warmup:
        return (step + 1) / warmup
    last = max_steps - 1
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_start = max(warmup, last - max(1, math.ceil(decay_fraction * max_steps)) + 1)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, last - decay_start + 1))
        return 1.0 - (1.0 - min_ratio) * progress
    progress = 1.0 if last <= warmup else min(1.0, (step - warmup) / (last - warmup))
    if kind == "cosine_warmup":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear_warmup":
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


class LRSchedule:
    def __init__(self, optimizers, kind: str, max_steps: int, warmup: int, min_ratio: float = 0.1,
                 decay_fraction: float = 0.2):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        self.optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
        self.kind, self.max_steps, self.warmup = kind, max_steps, warmup
        self.min_ratio, self.decay_fraction = min_ratio, decay_fraction
        self.step_count = 0
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        self._apply()

    def factor(self, step: int | None = None) -> float:
        step = self.step_count if step is None else step
        return lr_factor(step, self.kind, self.max_steps, self.warmup, self.min_ratio, self.decay_fraction)

    def _apply(self) -> None:
        f = self.factor()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * f

    def set_max_steps(self, max_steps: int) -> None:
        """A run's length settled after it started (a time budget's plan): the next lr follows it."""
        self.max_steps = max_steps
        self._apply()

    def step(self) -> None:
        """Call once after each optimizer step: sets the lr for the next one."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "kind": self.kind, "max_steps": self.max_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()


def get_lr_scheduler(optimizer, config, kind: str | None = None) -> LRSchedule:
    """One schedule for `optimizer` (one optimizer or a list of them), counted in optimizer steps."""
    return LRSchedule(optimizer, kind or config.optim.schedule, config.training.max_steps, config.optim.warmup_steps,
                      config.optim.min_lr_ratio, config.optim.decay_fraction)
