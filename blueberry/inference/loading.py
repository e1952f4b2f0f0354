"""Load a run (or a quantized run) for inference: model in eval mode on the chosen device, config,
tokenizer, checkpoint path."""

from __future__ import annotations

from pathlib import Path

import torch

from ..configs import AdaptiveMoEModelConfig
from ..models import create_model
from ..training.checkpoint import load_weights, read_state, resolve_checkpoint, run_dir_of
from ..training.trained_run import run_tokenizer
from .quantize import quantize_model


def load_model(spec: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, config, tokenizer, checkpoint). A quantized run is rebuilt with its quantized layers."""
    ckpt = resolve_checkpoint(spec)
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


def quantization_of(checkpoint: Path) -> str | None:
    return (read_state(checkpoint).get("quantization") or {}).get("method")
