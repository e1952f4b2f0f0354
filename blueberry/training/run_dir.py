"""The run directory: its default name, and proof that it can be written before training starts."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..errors import UsageError


def default_run_dir(config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.architecture}"


def prepare_run_dir(run_dir: Path, resuming: bool) -> None:
    """Create the run directory and prove it is writable before any training starts."""
    if not resuming and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise UsageError(f"--out-dir {run_dir} already holds a run with checkpoints; continue it with "
                         f"--resume-from {run_dir}, or choose another --out-dir (nothing was overwritten)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out-dir {run_dir} is not writable ({exc.strerror}); choose a directory you can "
                         "write to") from None
    free = shutil.disk_usage(run_dir).free
    if free < 50 * 2**20:
        raise UsageError(f"--out-dir {run_dir}: only {free / 2**20:.0f} MiB free on that disk; free some space "
                         "or choose another directory")
