"""Checkpoints that survive crashes and refuse to execute code.

A checkpoint is a directory `RUN/checkpoints/step_000123/` holding
  model.safetensors   the weights (safetensors: data only, never code)
  state.pt            optimizer, scheduler, scaler, RNG and data-loader states, config, step;
                      loadable with torch.load(weights_only=True), which refuses pickled code
It is written to a temporary directory, fsynced and renamed into place; only then is the pointer file
`RUN/checkpoints/latest` replaced (also by rename). A kill at any moment therefore leaves `latest`
naming a complete checkpoint. `best` is a copy of the checkpoint with the lowest validation loss.

FSDP2 runs write sharded checkpoints instead, `step_000123.dcp/` (training/sharded_checkpoint.py: every rank
its own shards; dcp_reader.py reads them in any process, at any world size), committed by the same
rename-then-pointer steps (`commit_checkpoint`). Every reader here (`resolve_checkpoint`, `read_state`,
`load_weights`) takes both.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from ..atomic import atomic_write_text, fsync_dir
from ..errors import CheckpointError, UsageError
from .ensemble_dir import ENSEMBLE_FILE, ensemble_members, is_ensemble
from .layout import CHECKPOINTS

FORMAT = 1
WEIGHTS, STATE, POINTER = "model.safetensors", "state.pt", "latest"
DCP_SUFFIX, DCP_METADATA = ".dcp", ".metadata"


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    """A DCP directory (a sharded checkpoint, or `best` copied from one) rather than model.safetensors."""
    return (Path(checkpoint) / DCP_METADATA).is_file()


def _write_pointer(ckpt_root: Path, name: str) -> None:
    atomic_write_text(ckpt_root / POINTER, name + "\n")


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module | dict, state: dict, keep: int = 2,
                    best: bool = False) -> Path:
    """Write checkpoint `step_{step}` atomically, point `latest` at it, keep the newest `keep`.

    `model` is a module, or a full state dict already gathered from FSDP2 shards."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        if isinstance(model, dict):
            save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(tmp / WEIGHTS))
        else:
            save_model(model, str(tmp / WEIGHTS))
        torch.save({"format": FORMAT, "step": step, **state}, tmp / STATE)
        for f in (WEIGHTS, STATE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(root, tmp, name, keep=keep, best=best)


def commit_checkpoint(root: Path, tmp: Path, name: str, keep: int = 2, best: bool = False) -> Path:
    """Rename the complete, fsynced checkpoint directory `tmp` to `root/name`, then point `latest` at it,
    copy it to `best` when asked, keep the newest `keep` (single-file and sharded ones alike)."""
    final = root / name
    try:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(root, name)
    # the same step in the other format (a run resumed on another world size): `latest` no longer names it
    other = root / (name[:-len(DCP_SUFFIX)] if name.endswith(DCP_SUFFIX) else name + DCP_SUFFIX)
    shutil.rmtree(other, ignore_errors=True)
    if best:
        _replace_best(root, final)
    _prune(root, keep, current=name)
    return final


def _replace_best(root: Path, source: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".best.", dir=root))
    if is_sharded_checkpoint(source):
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    else:
        for f in (WEIGHTS, STATE):
            shutil.copy2(source / f, tmp / f)
    old = root / ".best.old"
    if old.exists():
        shutil.rmtree(old)
    if (root / "best").exists():
        os.replace(root / "best", old)
    os.replace(tmp, root / "best")
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def clean_stale_temporaries(run_dir: str | Path) -> None:
    """Remove half-written checkpoints left by a killed process (never complete ones)."""
    root = Path(run_dir) / CHECKPOINTS
    for tmp in root.glob(".*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.suffix == ".tmp":
            tmp.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path, runs_root: str | Path = "runs", run_dir: str | Path | None = None) -> Path:
    """A checkpoint directory from: 'latest' (the newest checkpoint of `run_dir` when given, else of the
    newest run under runs_root), a run directory, a checkpoint directory, or a file inside one."""
    p = resolve_run(path, runs_root, run_dir)
    if is_ensemble(p):
        first = ensemble_members(p)[0]
        raise UsageError(f"{p} is an ensemble of {len(ensemble_members(p))} runs, not one checkpoint: give one "
                              f"member (e.g. {first}); generate, chat, eval and serve take the ensemble itself")
    return p


def resolve_run(path: str | Path, runs_root: str | Path = "runs", run_dir: str | Path | None = None) -> Path:
    """Like `resolve_checkpoint`, but an ensemble run directory (`--ensemble`) is returned as it is."""
    if str(path) == "latest" and run_dir is not None:
        if not is_ensemble(run_dir) and not (Path(run_dir) / CHECKPOINTS / POINTER).exists():
            raise CheckpointError(f"--resume-from latest: {run_dir} (--out-dir) has no checkpoint yet; give "
                                  "the run directory that holds one")
        path = run_dir
    elif str(path) == "latest":
        candidates = sorted([*Path(runs_root).glob(f"*/{CHECKPOINTS}/{POINTER}"),
                             *Path(runs_root).glob(f"*/{ENSEMBLE_FILE}")], key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"--resume-from latest: no run with a checkpoint under {runs_root}/; "
                                  "give the run directory or checkpoint path")
        last = candidates[-1]
        path = last.parent if last.name == ENSEMBLE_FILE else last.parent.parent
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; give a run directory, a checkpoint "
                              "directory, or 'latest'")
    if is_ensemble(p):
        return p
    if (p / CHECKPOINTS / POINTER).exists():
        p = p / CHECKPOINTS
    if (p / POINTER).exists():
        name = (p / POINTER).read_text().strip()
        p = p / name
    if not ((p / WEIGHTS).exists() or is_sharded_checkpoint(p)) or not (p / STATE).exists():
        raise CheckpointError(f"{p} is not a complete checkpoint (needs {STATE} and {WEIGHTS}, or the "
                              f"{DCP_METADATA} of a sharded one)")
    return p


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint directory (an ensemble run directory is its own)."""
    return checkpoint if is_ensemble(checkpoint) else checkpoint.parent.parent


def read_state(checkpoint: Path) -> dict:
    try:
        state = torch.load(checkpoint / STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{checkpoint / STATE} was refused: it holds objects other than tensors and plain "
                              f"data, which could run code on load ({str(exc).splitlines()[0]}). Only load "
                              "checkpoints you trust, and never with weights_only=False") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint / STATE} is damaged or truncated ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint / STATE} is not a Blueberry checkpoint of format {FORMAT}")
    return state


def load_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """Load model.safetensors (or a sharded checkpoint's weights) into `model`; a mismatch lists the tensors
    that differ."""
    if is_sharded_checkpoint(checkpoint):
        return _load_sharded_weights(checkpoint, model)
    path = checkpoint / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged or truncated ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = _shape_problems(shapes, expected)
    if not problems:
        try:
            missing, unexpected = load_model(model, str(path), strict=False)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{path} is damaged or truncated ({str(exc).splitlines()[0]})") from None
        problems += [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    _refuse_architecture(path, problems)


def _load_sharded_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    from .dcp_reader import load_sharded_weights, saved_shapes, tied_names

    shapes = {k[len("model."):]: s for k, s in saved_shapes(checkpoint).items() if k.startswith("model.")}
    tied = tied_names(model)  # stored once, under the name they are tied to
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    _refuse_architecture(checkpoint, _shape_problems(shapes, expected) + [f"missing {k}" for k in expected
                                                                          if k not in shapes])
    load_sharded_weights(checkpoint, model)


def _shape_problems(shapes: dict, expected: dict) -> list[str]:
    problems = [f"{k}: checkpoint {s} vs model {expected[k]}" for k, s in shapes.items()
                if k in expected and s != expected[k]]
    return problems + [f"unexpected {k} {s}" for k, s in shapes.items() if k not in expected]


def _refuse_architecture(path: Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"{path} was saved from a different architecture: {'; '.join(problems[:12])}"
                              f"{' ...' if len(problems) > 12 else ''}. "
                              "Use the same model settings as the run that wrote it")


def check_optimizer_layout(optimizers: list, states: list[dict]) -> None:
    """Refuse, with a clear message, optimizer states whose parameter groups do not match this version's."""
    if len(states) != len(optimizers):
        raise CheckpointError(f"the checkpoint holds {len(states)} optimizer state(s), this run builds "
                              f"{len(optimizers)}: resume with the same --optimizer as the run that wrote it")
    for opt, state in zip(optimizers, states):
        saved = [len(g["params"]) for g in state.get("param_groups", [])]
        ours = [len(g["params"]) for g in opt.param_groups]
        if saved != ours:
            raise CheckpointError(
                f"the checkpoint's {type(opt).__name__} state has parameter groups of sizes {saved}, this version "
                f"builds {ours} (an earlier Blueberry version, or other model settings, wrote it). Resume it with "
                "the version and settings that wrote it; its weights still load with `blueberry eval`/`generate`")
