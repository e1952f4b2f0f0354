"""The package's messages: one `logging` logger per module under "blueberry", shown on standard output, one
line each, by the main process only (rank 0 of a `torchrun` launch: its `RANK`), warnings by every process.

    from ..logs import get_logger
    log = get_logger(__name__).info        # log(f"...") as print would, on rank 0 only

`quiet()` silences them for a block (a step whose messages would repeat another's); `prefixed("[member 1] ")`
starts every line with a tag (the processes of an ensemble trained side by side). Library users tune them as
any logger: `logging.getLogger("blueberry").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

ROOT = "blueberry"


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (a redirect, pytest's capture), as print does."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.environ.get("RANK", "0") == "0"


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_MainProcessOnly())
        root.addHandler(handler)
        if root.level == logging.NOTSET:  # a level the application set first is kept
            root.setLevel(logging.INFO)
        root.propagate = False  # printed once, here, whatever the application does with the root logger
    return root


def get_logger(name: str) -> logging.Logger:
    _root()
    return logging.getLogger(name)


@contextlib.contextmanager
def quiet():
    """No info lines from the package inside the block (warnings still show)."""
    root = _root()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def prefixed(prefix: str) -> None:
    """Every later line of this process starts with `prefix`."""
    for handler in _root().handlers:
        handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
