"""Training infrastructure: the loop, evaluation, checkpoints, metrics, plots, sweeps, distribution."""

from .checkpoint import load_weights, read_state, resolve_checkpoint, save_checkpoint
from .evaluation import evaluate_model
from .run import run_training
from .trainer import train_model

__all__ = ["evaluate_model", "load_weights", "read_state", "resolve_checkpoint", "run_training",
           "save_checkpoint", "train_model"]
