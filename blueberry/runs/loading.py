"""Loading a run for use: the model in eval mode on the chosen device, its config, its tokenizer and the
checkpoint it came from. One loader for every kind of run directory: a trained run (plain, SFT, resumed, at
any world size, single-file or sharded checkpoint), an imported transformers model (`blueberry import`),
a quantized run (`blueberry quantize`: rebuilt with its quantized layers) and an ensemble run (its members
as one `EnsembleLM`; the checkpoint returned is then the ensemble's run directory)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..configs import AdaptiveMoEModelConfig
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import CheckpointError
from ..models import create_model
from ..models.ensemble import EnsembleLM
from ..ops.quantize import quantize_model
from .checkpoint import load_weights, read_state, resolve_run, run_dir_of
from .ensemble_dir import ensemble_members, is_ensemble
from .layout import HF_TOKENIZER, TOKENIZER


def load_model(spec: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, config, tokenizer, checkpoint) of a run directory, a checkpoint directory, or 'latest'."""
    ckpt = resolve_run(spec)
    if is_ensemble(ckpt):
        return _load_ensemble(ckpt, device, dtype)
    state = read_state(ckpt)
    config = AdaptiveMoEModelConfig.from_dict(state["config"])
    method = quantization_in(state)
    model = create_model(config)  # plain linears: FP8 is a training transform
    if method == "int8":
        quantize_model(model, "int8")  # the layers' structure; the values come from the checkpoint
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_weights(ckpt, model)
    model = model.to(dev)
    if dtype is not None and method != "int4":
        model = model.to(dtype)
    if method == "int4":
        quantize_model(model, "int4")
    return model.eval(), config, run_tokenizer(run_dir_of(ckpt)), ckpt


def _load_ensemble(run_dir: Path, device, dtype):
    members = ensemble_members(run_dir)
    loaded = [load_model(member, device, dtype) for member in members]
    tokenizer = loaded[0][2]
    for member, (_, _, other, _) in zip(members[1:], loaded[1:]):
        if other.content_id != tokenizer.content_id:
            raise CheckpointError(f"{member} has another tokenizer than the ensemble's first member: their "
                                  "distributions cannot be averaged")
    try:
        model = EnsembleLM([m for m, *_ in loaded])
    except ValueError as exc:
        raise CheckpointError(f"{run_dir}: {exc}") from None
    return model.eval(), loaded[0][1], tokenizer, run_dir


def run_tokenizer(run_dir: Path) -> Tokenizer:
    """A run's tokenizer: an imported model's own files (hf_tokenizer/), else the run's tokenizer.json."""
    if (run_dir / HF_TOKENIZER).is_dir():
        return load_tokenizer(str(run_dir / HF_TOKENIZER))
    path = run_dir / TOKENIZER
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {TOKENIZER}; was it written by `python train.py`?")
    return load_tokenizer(str(path))


def quantization_in(state: dict) -> str | None:
    """The quantization method ("int8", "int4") a checkpoint's state records, None for full precision."""
    return (state.get("quantization") or {}).get("method")


def quantization_of(checkpoint: Path) -> str | None:
    return quantization_in(read_state(checkpoint))
