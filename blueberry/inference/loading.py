"""Load a run (a quantized run, or an ensemble run: its members as one `EnsembleLM`) for inference: model in
eval mode on the chosen device, config, tokenizer, checkpoint path (an ensemble's: its run directory)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..configs import AdaptiveMoEModelConfig
from ..errors import CheckpointError
from ..models import create_model
from ..models.ensemble import EnsembleLM
from ..training.checkpoint import load_weights, read_state, resolve_run, run_dir_of
from ..training.ensemble_dir import ensemble_members, is_ensemble
from ..training.trained_run import run_tokenizer
from .quantize import quantize_model


def load_model(spec: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, config, tokenizer, checkpoint). A quantized run is rebuilt with its quantized layers."""
    ckpt = resolve_run(spec)
    if is_ensemble(ckpt):
        return _load_ensemble(ckpt, device, dtype)
    state = read_state(ckpt)
    config = AdaptiveMoEModelConfig.from_dict(state["config"])
    method = (state.get("quantization") or {}).get("method")
    model = create_model(config)
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


def quantization_of(checkpoint: Path) -> str | None:
    return (read_state(checkpoint).get("quantization") or {}).get("method")
