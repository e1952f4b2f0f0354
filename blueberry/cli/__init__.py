"""The command line: `python train.py ...`, `python -m blueberry ...`, `blueberry ...`."""

from .main import entry, main

__all__ = ["entry", "main"]
