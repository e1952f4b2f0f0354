"""`python -m blueberry ...`: the same command line as train.py."""

from .cli import entry

entry()
