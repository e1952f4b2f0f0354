"""Optional dependencies: which install extra brings which library, and the one-line error (exit 2) a user
sees when a command needs one that is not installed. The core install (`pip install blueberry`) trains,
generates, chats, scores bits per byte and tasks, quantizes to int8 and exports to transformers."""

from __future__ import annotations

import importlib
import importlib.util

from .errors import UsageError


def available(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, purpose: str):
    """Import `module`, or stop with a UsageError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed: "
                         f"pip install 'blueberry[{extra}]'") from None
