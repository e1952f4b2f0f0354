"""Weights & Biases: one wandb run per training run (offline with WANDB_MODE=offline)."""

from __future__ import annotations

import os

from . import Tracker


class WandbTracker(Tracker):
    def __init__(self, run_dir, run_name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "blueberry"), name=run_name,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), reinit="create_new")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})

    def close(self) -> None:
        self.run.finish()


def create(run_dir, run_name: str) -> WandbTracker:
    return WandbTracker(run_dir, run_name)
