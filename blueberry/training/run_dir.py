"""The run directory: its default name, and proof that it can be written before training starts."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..errors import UsageError


def default_run_dir(config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.architecture}"


# What a run writes into its directory; a directory holding anything else is not a run's, and a new run
# refuses it rather than write over (or beside) what it did not create.
RUN_ENTRIES = frozenset({"config.json", "tokenizer.json", "hf_tokenizer", "metrics.jsonl", "samples.txt",
                         "tensorboard", "checkpoints", "loss_curve.png", "expert_load.png", "launch.json",
                         "mlruns", "wandb"})  # the last two: the MLflow and W&B trackers' default places


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse (exit 2, nothing written) a --out-dir that holds a run (checkpoints, a summary, an ensemble)
    or files no run wrote. An empty directory, or a run stopped before its first checkpoint, is reused."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UsageError(f"--out-dir {run_dir} is a file, not a directory; choose another --out-dir")
    held = "an ensemble run" if (run_dir / "ensemble.json").exists() else "a run with checkpoints"
    checkpoints = run_dir / "checkpoints"
    if ((run_dir / "ensemble.json").exists() or _finished_summary(run_dir / "summary.json")
            or (checkpoints.is_dir() and any(checkpoints.iterdir()))):
        raise UsageError(f"--out-dir {run_dir} already holds {held}; continue it with --resume-from {run_dir}, "
                         "or choose another --out-dir (nothing was overwritten)")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES | {"summary.json"}
                     and not p.name.startswith(".write-test-"))
    if foreign:
        raise UsageError(f"--out-dir {run_dir} holds files no run wrote (e.g. {foreign[0]}); choose a new or "
                         "empty --out-dir (nothing was overwritten)")


def _finished_summary(path: Path) -> bool:
    """A summary.json other than that of a run stopped before its first checkpoint (which may be restarted)."""
    if not path.exists():
        return False
    try:
        return not json.loads(path.read_text()).get("stopped_by_signal")
    except (OSError, ValueError, AttributeError):
        return True


def prepare_run_dir(run_dir: Path, resuming: bool) -> None:
    """Create the run directory and prove it is writable before any training starts."""
    if not resuming:
        check_new_run_dir(run_dir)
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
