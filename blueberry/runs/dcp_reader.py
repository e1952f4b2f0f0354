"""Reading sharded (DCP) checkpoints in any process, at any world size, without running code.

Used by every reader of checkpoints (checkpoint.load_weights: export, generate, eval, --init-from, resume)
and by the resume of optimizer states. A process without a process group reads each tensor whole; with one,
each rank reads what its own layout asks for (DCP reshards on read), so a checkpoint of N ranks loads on M.
Safety as for single-file checkpoints: DCP's `.metadata` is a pickle, read here by an unpickler that admits
DCP's own metadata classes, torch.Size and dtypes only; and only tensors are ever loaded (DCP reads them with
torch.load(weights_only=True)); the non-tensor parts of optimizer states are in state.pt (`split_tensors`).
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from ..errors import CheckpointError

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
def single_process_quiet():
    """Without a process group DCP warns that it reads or writes in one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _load(target: dict, checkpoint: Path) -> None:
    """Fill the tensors of `target` (plain or DTensor) in place from the checkpoint; a collective when a
    process group is up, one process's read otherwise."""
    with single_process_quiet():
        try:
            dcp.load(target, storage_reader=SafeReader(checkpoint))
        except CheckpointError:
            raise
        except Exception as exc:  # DCP wraps each rank's failure; the first line says what it was
            raise CheckpointError(f"{checkpoint} could not be read ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_sharded_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """The weights of a sharded checkpoint into `model` (plain, or sharded by FSDP2), at any world size; the
    caller (checkpoint.load_weights) has compared the shapes."""
    tied = tied_names(model)
    _load({f"model.{k}": v for k, v in model.state_dict().items() if k not in tied}, checkpoint)


def load_sharded_optimizers(checkpoint: Path, model, optimizers: list, skeletons: list, experts=None) -> None:
    """Each optimizer's state from a sharded checkpoint, laid out as this run's parameters are (any world size;
    `experts`, expert parallelism's handle: each rank reads its own experts' states)."""
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
    wrapped = experts.as_dtensors(target) if experts is not None else []
    _load(target, checkpoint)
    if experts is not None:
        experts.plain_tensors(target, wrapped)
    for i, (opt, skeleton) in enumerate(zip(optimizers, skeletons)):
        set_optimizer_state_dict(model, opt, join_tensors(skeleton, f"optim.{i}", target))


def tied_names(model) -> set[str]:
    """Names of parameters that are another's (tied embeddings): stored once, under the first name."""
    first, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        first.add(id(p))
    return tied

