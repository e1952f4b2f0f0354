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

Tied weights (lm_head = embed) are stored once. Under expert parallelism each rank writes its own experts (see
expert_parallel.as_dtensors); the checkpoint holds the whole (E, ...) tensors as a plain run's does. Reading, in
any process and at any world size, without running code: runs/dcp_reader.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from ..errors import CheckpointError
from ..runs.checkpoint import DCP_SUFFIX, FORMAT, STATE, commit_checkpoint
from ..runs.dcp_reader import single_process_quiet, split_tensors, tied_names
from ..runs.layout import CHECKPOINTS
from .expert_parallel import expert_parallel_of


def _checkpoint_tensors(model, optimizers) -> tuple[dict, list]:
    """The flat dict of tensors that DCP writes (this rank's shards) and each optimizer's skeleton."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat: dict = {}
    tied = tied_names(model)
    split_tensors({k: v for k, v in get_model_state_dict(model).items() if k not in tied}, "model", flat)
    skeletons = [split_tensors(get_optimizer_state_dict(model, opt), f"optim.{i}", flat)
                 for i, opt in enumerate(optimizers)]
    experts = expert_parallel_of(model)
    if experts is not None:  # each rank's experts: its shard of the whole
        experts.as_dtensors(flat)
    return flat, skeletons


class ShardedCheckpointer:
    """Writes sharded checkpoints of one run: every rank calls `save` (a collective), rank 0 commits.
    With `asynchronous`, `save` returns once the shards are copied; `poll` (each step) and `wait` commit."""

    def __init__(self, run_dir, ctx, asynchronous: bool = False):
        self.root, self.ctx, self.asynchronous = Path(run_dir) / CHECKPOINTS, ctx, asynchronous
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
        with single_process_quiet():
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
