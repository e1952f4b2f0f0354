"""Training infrastructure: the loop, evaluation, metrics, plots, sweeps, distribution (run directories and
their checkpoints: blueberry.runs)."""

from .evaluation import evaluate_model
from .run import run_training
from .trainer import train_model

__all__ = ["evaluate_model", "run_training", "train_model"]
