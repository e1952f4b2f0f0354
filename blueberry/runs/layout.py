"""A run directory's layout: the names of the files a run writes, reading and writing them, the default
directory name, and proof that a new run may write where it is told to.

    RUN/config.json        the run's config (what `--resume-from` and the readers rebuild the model from)
    RUN/tokenizer.json     its tokenizer (RUN/hf_tokenizer/: an imported model's own tokenizer files)
    RUN/checkpoints/       its checkpoints and the `latest` pointer (checkpoint.py)
    RUN/metrics.jsonl      one line per logged step and evaluation
    RUN/samples.txt        the text sampled at each evaluation
    RUN/summary.json       the run's final figures
    RUN/launch.json        an ensemble member's launch config (ensemble_dir.py: RUN/ensemble.json)
    RUN/quantization.json  a quantized run's report (`blueberry quantize`)

Nothing outside `blueberry.runs` names these files: they are read and written through this module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..configs import AdaptiveMoEModelConfig, save_config
from ..errors import UsageError

CONFIG, TOKENIZER, HF_TOKENIZER = "config.json", "tokenizer.json", "hf_tokenizer"
CHECKPOINTS, METRICS, SAMPLES, SUMMARY = "checkpoints", "metrics.jsonl", "samples.txt", "summary.json"
LAUNCH, ENSEMBLE, QUANTIZATION = "launch.json", "ensemble.json", "quantization.json"


def write_config(run_dir: Path, config, name: str = CONFIG) -> None:
    save_config(config, Path(run_dir) / name)


def read_config(run_dir: Path, name: str = CONFIG) -> AdaptiveMoEModelConfig:
    return AdaptiveMoEModelConfig.from_dict(json.loads((Path(run_dir) / name).read_text()))


def write_summary(run_dir: Path, metrics: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(metrics, indent=2, default=str))


def read_summary(run_dir: Path) -> dict:
    """The run's summary.json, {} when it has none (a run stopped before its end)."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else {}


def write_quantization_report(run_dir: Path, report: dict) -> None:
    atomic_write_text(Path(run_dir) / QUANTIZATION, json.dumps(report, indent=2) + "\n")


def copy_tokenizer(source_run: Path, run_dir: Path) -> None:
    """A run's tokenizer files copied into another run directory (as `run_tokenizer` reads them)."""
    source_run, run_dir = Path(source_run), Path(run_dir)
    if (source_run / HF_TOKENIZER).is_dir():
        shutil.copytree(source_run / HF_TOKENIZER, run_dir / HF_TOKENIZER)
    if (source_run / TOKENIZER).exists():
        shutil.copy2(source_run / TOKENIZER, run_dir / TOKENIZER)


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def samples_path(run_dir: Path) -> Path:
    return Path(run_dir) / SAMPLES


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's records, oldest first (a line cut by a kill is skipped)."""
    path = metrics_path(run_dir)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def default_run_dir(config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.architecture}"


# What a run writes into its directory; a directory holding anything else is not a run's, and a new run
# refuses it rather than write over (or beside) what it did not create. mlruns and wandb: the MLflow and W&B
# trackers' default places.
RUN_ENTRIES = frozenset({CONFIG, TOKENIZER, HF_TOKENIZER, METRICS, SAMPLES, "tensorboard", CHECKPOINTS,
                         "loss_curve.png", "expert_load.png", LAUNCH, "mlruns", "wandb"})


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse (exit 2, nothing written) a --out-dir that holds a run (checkpoints, a summary, an ensemble)
    or files no run wrote. An empty directory, or a run stopped before its first checkpoint, is reused."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UsageError(f"--out-dir {run_dir} is a file, not a directory; choose another --out-dir")
    held = "an ensemble run" if (run_dir / ENSEMBLE).exists() else "a run with checkpoints"
    checkpoints = run_dir / CHECKPOINTS
    if ((run_dir / ENSEMBLE).exists() or _finished_summary(run_dir / SUMMARY)
            or (checkpoints.is_dir() and any(checkpoints.iterdir()))):
        raise UsageError(f"--out-dir {run_dir} already holds {held}; continue it with --resume-from {run_dir}, "
                         "or choose another --out-dir (nothing was overwritten)")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES | {SUMMARY}
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
