"""Load a trained model, its config and its tokenizer from a run or checkpoint (for generate/eval/export)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..configs import AdaptiveMoEModelConfig
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import CheckpointError
from ..models import create_model
from .checkpoint import load_weights, read_state, resolve_checkpoint, run_dir_of


def run_tokenizer(run_dir: Path) -> Tokenizer:
    if (run_dir / "hf_tokenizer").is_dir():
        return load_tokenizer(str(run_dir / "hf_tokenizer"))
    path = run_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no tokenizer.json; was it written by `python train.py`?")
    return load_tokenizer(str(path))


def load_trained(spec: str | Path, device: str | None = None):
    """(model in eval mode, config, tokenizer, checkpoint path)."""
    ckpt = resolve_checkpoint(spec)
    state = read_state(ckpt)
    config = AdaptiveMoEModelConfig.from_dict(state["config"])
    model = create_model(config)  # plain linears: FP8 is a training transform
    load_weights(ckpt, model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = run_tokenizer(run_dir_of(ckpt))
    return model.to(dev).eval(), config, tokenizer, ckpt
