"""Training infrastructure: the loop, evaluation, metrics, plots, sweeps, distribution (run directories and
their checkpoints: blueberry.runs).

The three names below load on first use, so that a command reaching one module of this package (the clock of
training.budget, a memory estimate) does not import the loop, its compiler and its plots."""

from importlib import import_module

_EXPORTS = {"evaluate_model": ".evaluation", "run_training": ".run", "train_model": ".trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
