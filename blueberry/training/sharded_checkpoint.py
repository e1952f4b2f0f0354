"""Sharded checkpoints of FSDP2 runs (torch.distributed.checkpoint, "DCP"), readable at any world size.

A sharded checkpoint is a directory `RUN/checkpoints/step_000123.dcp/` holding
  .metadata, __R_0.distcp   DCP's files: every rank writes its own shards of the weights (`model.NAME`) and
                            of each optimizer's tensors (`optim.I.state.NAME.KEY`); no rank gathers the model
  state.pt                  as in a single-file checkpoint (scheduler, scaler, RNG, data position, config,
                            step), plus each optimizer's state dict with its tensors replaced by TENSOR: the
                            param groups and plain values, keyed by parameter name
Commit: rank 0 makes `.step_000123.dcp.partial/`, every rank writes its shards there (fsynced), rank 0 adds
state.pt and renames the directory into place; only then does `latest` move (checkpoint.commit_checkpoint).
A kill at any moment leaves `latest` naming a complete checkpoint; the partial directory is removed at the
next start. With `--async-checkpoint` the shards are copied in memory and written by a background thread
(over a gloo process group of its own) while training goes on; the commit happens when the write is done.

Reading needs no process group (export, generate, eval, --init-from, a resume on one process): DCP reads
each tensor whole or as the shards the reader's own layout asks for, so a checkpoint of N ranks resumes on
M. Safety as for single-file checkpoints: `.metadata` (a pickle) is read by an unpickler that admits DCP's
own metadata classes, torch.Size and dtypes only, and only tensors are ever loaded (weights_only).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from ..errors import CheckpointError
from .checkpoint import DCP_SUFFIX, FORMAT, STATE, architecture_refusal, commit_checkpoint

TENSOR = "<tensor in the DCP files>"  # what stands for a tensor in state.pt's optimizer skeletons
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                     ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's `.metadata` is made of: anything else is refused, never constructed."""

    def find_class(self, module, name):
        if module in _METADATA_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        elif (module, name) in _METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the allow-list unpickler."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path} was refused: it holds objects other than DCP metadata, which could "
                                  f"run code on load ({exc}). Only load checkpoints you trust") from None
        except (OSError, EOFError, ValueError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def saved_shapes(checkpoint: Path) -> dict[str, tuple]:
    """Every tensor of a sharded checkpoint: its key and its whole (unsharded) shape."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeReader(checkpoint).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def split_tensors(tree, prefix: str, flat: dict):
    """`tree` with each tensor (in nested dicts) moved into `flat` under its dotted path, TENSOR left in its place."""
    if isinstance(tree, dict):
        return {k: split_tensors(v, f"{prefix}.{k}", flat) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        flat[prefix] = tree
        return TENSOR
    return tree


def join_tensors(skeleton, prefix: str, flat: dict):
    """The inverse of `split_tensors`."""
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, f"{prefix}.{k}", flat) for k, v in skeleton.items()}
    return flat[prefix] if isinstance(skeleton, str) and skeleton == TENSOR else skeleton


def tensor_paths(skeleton, prefix: str):
    """The paths of the tensors that `split_tensors` took out of a tree."""
    if isinstance(skeleton, dict):
        for k, v in skeleton.items():
            yield from tensor_paths(v, f"{prefix}.{k}")
    elif isinstance(skeleton, str) and skeleton == TENSOR:
        yield prefix


@contextlib.contextmanager
def _single_process_quiet():
    """Without a process group DCP warns that it reads or writes in one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _load(target: dict, checkpoint: Path) -> None:
    """Fill the tensors of `target` (plain or DTensor) in place from the checkpoint; a collective when a
    process group is up, one process's read otherwise."""
    with _single_process_quiet():
        try:
            dcp.load(target, storage_reader=SafeReader(checkpoint))
        except CheckpointError:
            raise
        except Exception as exc:  # DCP wraps each rank's failure; the first line says what it was
            raise CheckpointError(f"{checkpoint} could not be read ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_sharded_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """The weights of a sharded checkpoint into `model` (plain, or sharded by FSDP2), at any world size."""
    shapes = {k[len("model."):]: s for k, s in saved_shapes(checkpoint).items() if k.startswith("model.")}
    target = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in target.items()}
    problems = architecture_refusal(shapes, expected)
    problems += [f"missing {k}" for k in expected if k not in shapes]
    if problems:
        raise CheckpointError(f"{checkpoint} was saved from a different architecture: {'; '.join(problems[:12])}"
                              f"{' ...' if len(problems) > 12 else ''}. "
                              "Use the same model settings as the run that wrote it")
    _load({f"model.{k}": v for k, v in target.items()}, checkpoint)


def load_sharded_optimizers(checkpoint: Path, model, optimizers: list, skeletons: list) -> None:
    """Each optimizer's state from a sharded checkpoint, laid out as this run's parameters are (any world size)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    shapes = saved_shapes(checkpoint)
    live, needed = {}, {}
    for i, (opt, skeleton) in enumerate(zip(optimizers, skeletons)):
        split_tensors(get_optimizer_state_dict(model, opt), f"optim.{i}", live)  # this run's layout
        needed.update(dict.fromkeys(tensor_paths(skeleton, f"optim.{i}")))
    absent = [k for k in needed if k not in live or k not in shapes]
    if absent:
        raise CheckpointError(f"{checkpoint}: its optimizer state does not fit this run's parameters (e.g. "
                              f"{absent[0]}): resume with the model and --optimizer of the run that wrote it")
    target = {k: live[k] for k in needed}
    _load(target, checkpoint)
    for i, (opt, skeleton) in enumerate(zip(optimizers, skeletons)):
        set_optimizer_state_dict(model, opt, join_tensors(skeleton, f"optim.{i}", target))


def _checkpoint_tensors(model, optimizers) -> tuple[dict, list]:
    """The flat dict of tensors that DCP writes (this rank's shards) and each optimizer's skeleton."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat: dict = {}
    split_tensors(get_model_state_dict(model), "model", flat)
    skeletons = [split_tensors(get_optimizer_state_dict(model, opt), f"optim.{i}", flat)
                 for i, opt in enumerate(optimizers)]
    return flat, skeletons


class ShardedCheckpointer:
    """Writes sharded checkpoints of one run: every rank calls `save` (a collective), rank 0 commits.
    With `asynchronous`, `save` returns once the shards are copied; `poll` (each step) and `wait` commit."""

    def __init__(self, run_dir, ctx, asynchronous: bool = False):
        self.root, self.ctx, self.asynchronous = Path(run_dir) / "checkpoints", ctx, asynchronous
        self._pending = None  # (future, partial dir, name, state, keep, best)
        self._group = None

    def save(self, step: int, model, optimizers: list, state: dict, keep: int, best: bool = False) -> Path | None:
        self.wait()  # one write at a time: the previous one commits first
        name = f"step_{step:06d}{DCP_SUFFIX}"
        tmp = self.root / f".{name}.partial"
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.ctx.barrier()  # the directory exists for every rank
        flat, skeletons = _checkpoint_tensors(model, optimizers)
        state = {"format": FORMAT, "step": step, **state, "optimizers": skeletons, "sharded": True}
        writer = FileSystemWriter(tmp, sync_files=True, thread_count=1)
        if self.asynchronous and self.ctx.enabled:
            if self._group is None:  # the background write's collectives must not meet the training's
                self._group = dist.new_group(backend="gloo")
            future = dcp.async_save(flat, storage_writer=writer, process_group=self._group)
            self._pending = (getattr(future, "upload_completion", future), tmp, name, state, keep, best)
            return None
        with _single_process_quiet():
            dcp.save(flat, storage_writer=writer)
        return self._commit(tmp, name, state, keep, best)

    def _commit(self, tmp: Path, name: str, state: dict, keep: int, best: bool) -> Path | None:
        if not self.ctx.is_main:
            return None
        torch.save(state, tmp / STATE)
        with open(tmp / STATE, "rb") as fh:
            os.fsync(fh.fileno())
        return commit_checkpoint(self.root, tmp, name, keep=keep, best=best)

    def poll(self) -> None:
        """Commit a finished background write (no collective: each rank looks at its own)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> Path | None:
        """Wait for the background write, if any, and commit it."""
        if self._pending is None:
            return None
        future, tmp, name, state, keep, best = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as exc:
            raise CheckpointError(f"writing the sharded checkpoint {name} failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); `latest` still names "
                                  "the previous one") from None
        return self._commit(tmp, name, state, keep, best)
