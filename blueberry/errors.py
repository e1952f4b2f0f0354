"""Exceptions that the command line turns into one clear message and an exit code.

UsageError -> exit 2: the user asked for something invalid (a flag, a config field, a path, a dataset).
RunError   -> exit 1: a valid request failed at run time (corrupt checkpoint, disk full, diverged run).
"""


class BlueberryError(Exception):
    """Base class: the message is written for the user and is shown without a traceback."""

    exit_code = 1


class UsageError(BlueberryError):
    exit_code = 2


class RunError(BlueberryError):
    exit_code = 1


class ConfigError(UsageError):
    """A configuration field holds a value outside its allowed range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(UsageError):
    """The data source cannot be used as given (missing, empty, malformed, too small)."""


class CheckpointError(RunError):
    """A checkpoint is missing, damaged, unsafe or does not fit the model."""
