"""TensorBoard: event files in <run>/tensorboard (the scalars; the config and summary as text)."""

from __future__ import annotations

import json

from . import Tracker


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```", 0)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, summary: dict) -> None:
        self.writer.add_text("summary", f"```\n{json.dumps(summary, indent=2, default=str)}\n```",
                             int(summary.get("step") or 0))

    def close(self) -> None:
        self.writer.close()


def create(run_dir, run_name: str) -> TensorBoardTracker:
    return TensorBoardTracker(run_dir)
