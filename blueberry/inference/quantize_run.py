"""`blueberry quantize RUN OUT`: quantize a run's weights, measure what it costs, write a loadable run (of an
ensemble run: every member, into an ensemble run of the quantized members)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from ..atomic import building_dir, refuse_non_empty
from ..data.held_out import validation_loader
from ..errors import UsageError
from ..runs.checkpoint import read_state, resolve_run
from ..runs.ensemble_dir import ensemble_members, is_ensemble, member_dir, write_ensemble_file
from ..training.evaluation import evaluate_model
from ..ops.quantize import quantize_model, weight_bytes
from ..runs.layout import CONFIG, copy_tokenizer, write_quantization_report
from ..runs.loading import load_model, quantization_of
from ..runs.quantized import save_quantized_run


def validation_bits_per_byte(model, config, tokenizer, batches: int) -> float:
    """Bits per byte on the run's own validation split (its documents, conversations or token stores)."""
    loader = validation_loader(config, tokenizer, batches)
    with torch.no_grad():
        return evaluate_model(model, loader, config, token_bytes=tokenizer.token_bytes())["bits_per_byte"]


def quantize_run(run: str, out: str, method: str, device: str | None, eval_batches: int) -> dict:
    """Quantize `run` into `out`; returns the report (bits per byte before/after, weight bytes)."""
    resolved = resolve_run(run)
    refuse_non_empty(out)  # before the work: nothing is ever written over
    if is_ensemble(resolved):
        return _quantize_ensemble(resolved, Path(out), method, device, eval_batches)
    already = quantization_of(resolved)
    if already:
        raise UsageError(f"{run} is already quantized ({already}); quantize the run it was made from")
    model, config, tokenizer, ckpt = load_model(run, device)
    report = {"weight_bytes_before": weight_bytes(model)}
    report["bits_per_byte_before"] = validation_bits_per_byte(model, config, tokenizer, eval_batches)
    quantized = quantize_model(copy.deepcopy(model), method)
    report["weight_bytes_after"] = weight_bytes(quantized)
    report["bits_per_byte_after"] = validation_bits_per_byte(quantized, config, tokenizer, eval_batches)
    report["bits_per_byte_change_percent"] = 100 * (report["bits_per_byte_after"] / report["bits_per_byte_before"] - 1)
    with building_dir(out) as tmp:  # renamed to `out` when complete: a kill leaves no half-written run
        save_quantized_run(quantized, read_state(ckpt), tokenizer, tmp, method, report)
    return report


def _quantize_ensemble(run: Path, out: Path, method: str, device: str | None, eval_batches: int) -> dict:
    """Every member quantized into OUT/members/<i>; the report is the ensemble's, before and after."""
    members = ensemble_members(run)
    with building_dir(out) as tmp:  # the whole ensemble under a temporary name, renamed when complete
        for i, member in enumerate(members):
            quantize_run(str(member), str(member_dir(tmp, i)), method, device, eval_batches)
        write_ensemble_file(tmp, len(members))
        if (run / CONFIG).exists():
            shutil.copy2(run / CONFIG, tmp / CONFIG)  # the ensemble's own config, as it was
        copy_tokenizer(run, tmp)
        report = {}
        for when, path in (("before", run), ("after", tmp)):
            model, config, tokenizer, _ = load_model(path, device)
            report[f"weight_bytes_{when}"] = weight_bytes(model)
            report[f"bits_per_byte_{when}"] = validation_bits_per_byte(model, config, tokenizer, eval_batches)
        report["bits_per_byte_change_percent"] = 100 * (report["bits_per_byte_after"] / report["bits_per_byte_before"] - 1)
        write_quantization_report(tmp, {"method": method, **report})
    return report
