"""Experiment trackers beside metrics.jsonl: TensorBoard (the default), Weights & Biases, MLflow, Trackio.

`--tracker tensorboard,wandb,mlflow,trackio` picks any of them (`none`: metrics.jsonl only). Each one logs the
same scalars as metrics.jsonl (named `<kind>/<name>`, e.g. `train/loss`, `eval/val_loss`, at the record's
step), the run's config once at the start and the final summary (summary.json) at the end. Only the main
process creates trackers. The libraries are optional and imported only when asked for: wandb and mlflow-skinny
come with `pip install 'blueberry[trackers]'`; trackio is installed apart (`pip install trackio`: its
pillow<13 conflicts with the pillow of constraints.txt). A missing one is a UsageError (exit 2) saying what
to install.

Where each writes (their own environment variables take precedence):
  tensorboard  <run>/tensorboard
  wandb        WANDB_DIR (default <run>), project WANDB_PROJECT (default blueberry); WANDB_MODE=offline
               keeps it on disk (`wandb sync` uploads it later)
  mlflow       MLFLOW_TRACKING_URI (default file:<run>/mlruns), experiment MLFLOW_EXPERIMENT_NAME (default blueberry)
  trackio      TRACKIO_DIR (default ~/.cache/huggingface/trackio), project TRACKIO_PROJECT (default blueberry)
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

from ...configs.fields import TRACKERS, parse_trackers  # noqa: F401  (the names live with the config)
from ...errors import UsageError

_MODULES = {"tensorboard": "tensorboard_tracker", "wandb": "wandb_tracker", "mlflow": "mlflow_tracker",
            "trackio": "trackio_tracker"}
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'blueberry[trackers]'",
            "mlflow": "pip install 'blueberry[trackers]'", "trackio": "pip install trackio"}


class Tracker:
    """What every tracker does; the defaults do nothing."""

    def log_config(self, config: dict) -> None:
        pass

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


def scalars_of(kind: str, values: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, named `<kind>/<name>`."""
    return {f"{kind}/{key}": float(value) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def flat_config(config: dict) -> dict[str, str | int | float | bool]:
    """A config as flat scalar parameters (lists and None written as text), for trackers that want scalars."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def create_tracker(name: str, run_dir: Path, run_name: str) -> Tracker:
    """The tracker `name`, writing beside `run_dir`; UsageError if its library is not installed."""
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    try:
        return module.create(Path(run_dir), run_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("wandb", "mlflow", "trackio", "tensorboard"):
            raise UsageError(f"--tracker {name} needs the {e.name.split('.')[0]} package, which is not installed: "
                             f"{_INSTALL[name]}, or leave {name} out of --tracker") from None
        raise
