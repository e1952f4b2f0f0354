"""The command line: `python train.py ...`, `python -m blueberry ...`, `blueberry ...`."""

from .main import main

__all__ = ["main"]
