"""Writing a quantized run (`blueberry quantize`): the quantized model as the run's one checkpoint, beside the
config, the tokenizer and the quality report. `loading.load_model` rebuilds its quantized layers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import refuse_non_empty
from ..configs import AdaptiveMoEModelConfig
from .checkpoint import save_checkpoint
from .layout import TOKENIZER, write_config, write_quantization_report


def save_quantized_run(model: nn.Module, state: dict, tokenizer, out_dir, method: str, report: dict) -> Path:
    """Write a run directory holding the quantized model as its one checkpoint (loadable by generate, eval,
    serve and chat), its config and tokenizer, and `quantization.json` with the quality report."""
    out = Path(out_dir)
    refuse_non_empty(out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, AdaptiveMoEModelConfig.from_dict(state["config"]))
    tokenizer.save(out / TOKENIZER)
    weights = dict(model.state_dict())
    if method == "int4":  # torchao packs int4 for the device it runs on: stored as bf16, packed at load time
        weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}
    meta = {"config": state["config"], "tokenizer": state.get("tokenizer"), "quantization": {"method": method},
            "world_size": 1}
    save_checkpoint(out, state.get("step", 0), weights, meta, keep=1)
    write_quantization_report(out, {"method": method, **report})
    return out
