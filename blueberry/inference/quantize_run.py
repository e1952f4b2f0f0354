"""`blueberry quantize RUN OUT`: quantize a run's weights, measure what it costs, write a loadable run."""

from __future__ import annotations

import copy

import torch

from ..data import BatchLoader, create_dataset, load_and_cache_data
from ..training.checkpoint import read_state
from ..training.evaluation import evaluate_model
from .loading import load_model
from .quantize import quantize_model, save_quantized_run, weight_bytes


def validation_bits_per_byte(model, config, tokenizer, batches: int) -> float:
    _, _, corpus = load_and_cache_data(config, log=lambda *a: None)
    dataset = create_dataset(corpus.val, "packed", config.max_seq_len)
    loader = BatchLoader(dataset, min(config.batch_size, len(dataset)), shuffle=False, max_batches=batches)
    with torch.no_grad():
        return evaluate_model(model, loader, config, token_bytes=tokenizer.token_bytes())["bits_per_byte"]


def quantize_run(run: str, out: str, method: str, device: str | None, eval_batches: int) -> dict:
    """Quantize `run` into `out`; returns the report (bits per byte before/after, weight bytes)."""
    model, config, tokenizer, ckpt = load_model(run, device)
    report = {"weight_bytes_before": weight_bytes(model)}
    report["bits_per_byte_before"] = validation_bits_per_byte(model, config, tokenizer, eval_batches)
    quantized = quantize_model(copy.deepcopy(model), method)
    report["weight_bytes_after"] = weight_bytes(quantized)
    report["bits_per_byte_after"] = validation_bits_per_byte(quantized, config, tokenizer, eval_batches)
    report["bits_per_byte_change_percent"] = 100 * (report["bits_per_byte_after"] / report["bits_per_byte_before"] - 1)
    save_quantized_run(quantized, read_state(ckpt), tokenizer, out, method, report)
    return report
