"""Starting from pretrained weights: `blueberry import HF_DIR RUN_DIR` (a transformers checkpoint turned into
a Blueberry run) and `train.py --init-from HF_DIR|RUN_DIR` (continued pretraining or fine-tuning from a
transformers checkpoint or a Blueberry run: its architecture and tokenizer, our optimizers and loop)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import building_dir, refuse_non_empty
from ..configs import AdaptiveMoEModelConfig
from ..errors import UsageError
from ..export.huggingface import ImportRefused, is_hf_dir, model_fields_from_hf, read_hf_weights
from ..runs.checkpoint import load_weights, read_state, resolve_checkpoint, run_dir_of, save_checkpoint
from ..runs.layout import HF_TOKENIZER, TOKENIZER, write_config

MODEL_FIELDS = ("model_type", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "qkv_bias",
                "d_ff", "mlp_type", "qk_norm", "tie_embeddings", "rope_theta", "norm_eps", "num_experts",
                "expert_top_k", "moe_d_ff", "shared_expert", "layers", "ssm_state", "ssm_head_dim", "ssm_expand",
                "ssm_conv", "scan_chunk", "mod_capacity")


def source_settings(source: str) -> dict:
    """The architecture fields and tokenizer of an --init-from source (a transformers dir or a run)."""
    if is_hf_dir(source):
        fields = model_fields_from_hf(source)
        return {**{k: v for k, v in fields.items() if k in MODEL_FIELDS}, "tokenizer": str(Path(source).resolve())}
    checkpoint = resolve_checkpoint(source)
    saved = read_state(checkpoint)["config"]
    run = run_dir_of(checkpoint)
    tokenizer = saved.get("tokenizer")
    if tokenizer is None:  # a BPE trained by that run: its file
        tokenizer = str((run / TOKENIZER).resolve())
    return {**{k: saved[k] for k in MODEL_FIELDS if k in saved}, "tokenizer": tokenizer}


def apply_init_from(config: AdaptiveMoEModelConfig) -> AdaptiveMoEModelConfig:
    """The run's config with the source's architecture and tokenizer (the user's data, optimizer and
    training settings are kept; the window, --seq-len, too)."""
    if not config.training.init_from:
        return config
    settings = source_settings(config.training.init_from)
    return config.replace(**settings)


def load_initial_weights(model: torch.nn.Module, source: str) -> None:
    if is_hf_dir(source):
        weights = read_hf_weights(source, model.config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
        if missing or unexpected:
            raise ImportRefused(f"{source}: weights do not match the architecture (missing {missing[:4]}, "
                                f"unexpected {unexpected[:4]})")
        return
    load_weights(resolve_checkpoint(source), model)


def import_hf_run(hf_dir: str, run_dir: str, seq_len: int | None = None) -> Path:
    """A run directory holding the model as its one checkpoint (step 0, no optimizer state), its config and
    the model's own tokenizer (hf_tokenizer/)."""
    from transformers import AutoTokenizer

    from ..data.tokenizer import load_tokenizer

    if not is_hf_dir(hf_dir):
        raise UsageError(f"{hf_dir} is not a transformers model directory (no config.json with architectures)")
    out = Path(run_dir)
    refuse_non_empty(out, "run directory")
    fields = model_fields_from_hf(hf_dir)
    if seq_len:
        fields["max_seq_len"] = seq_len
    tokenizer_dir = (out / HF_TOKENIZER).resolve()
    config = AdaptiveMoEModelConfig(**fields, tokenizer=str(tokenizer_dir), use_fp8=False)
    weights = read_hf_weights(hf_dir, config.model)
    with building_dir(out, "run directory") as tmp:  # renamed to `out` when complete: a kill leaves no half
        AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True).save_pretrained(str(tmp / HF_TOKENIZER))
        # its identity names the directory it is loaded from: the final one, as a later load will see it
        identity = load_tokenizer(str(tmp / HF_TOKENIZER)).identity.replace(str(tmp / HF_TOKENIZER),
                                                                               str(tokenizer_dir), 1)
        write_config(tmp, config)
        save_checkpoint(tmp, 0, weights, {"config": config.to_dict(), "tokenizer": identity,
                                          "world_size": 1, "imported_from": str(hf_dir)}, keep=1)
    return out
