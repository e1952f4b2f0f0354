"""The test split (--test-fraction): documents held out of training and validation, scored once when a
run ends, so that choices made by watching the validation bits per byte (a recipe search) can be checked
on text nothing was tuned on. Added to summary.json as test_loss / test_bits_per_byte."""

from __future__ import annotations

from pathlib import Path

from ..data import BatchLoader, create_dataset
from ..data.corpus import encode_documents, run_documents, test_documents
from ..errors import DataError
from ..logs import get_logger, quiet
from ..runs.layout import write_summary
from .evaluation import evaluate_model
from .precision import choose_precision

log = get_logger(__name__).info


def held_out_test_loader(config, tokenizer, rank: int = 0, world_size: int = 1) -> tuple[BatchLoader, list]:
    """(a loader over every window of the run's test documents, this rank's share; the documents)."""
    with quiet():  # the documents were announced when the run read them
        documents = run_documents(config)
    docs = test_documents(documents, config.data.val_fraction, config.data.split_seed, config.data.test_fraction)
    tokens, _ = encode_documents(tokenizer, docs, None)
    dataset = create_dataset(tokens, "packed", config.model.max_seq_len)
    if len(dataset) < world_size:
        raise DataError(f"the test split ({len(tokens)} tokens) is shorter than one window per process")
    batch = max(1, min(config.training.batch_size, len(dataset) // world_size))
    return BatchLoader(dataset, batch, shuffle=False, rank=rank, world_size=world_size), docs


def score_test_split(model, config, tokenizer, ctx, run_dir: Path, metrics: dict) -> dict:
    """Evaluate `model` (every rank takes part) on the run's test documents; updates `metrics` and the summary."""
    if config.data.test_fraction <= 0:
        return metrics
    loader, docs = held_out_test_loader(config, tokenizer, ctx.rank, ctx.world_size)
    result = evaluate_model(model, loader, config, token_bytes=tokenizer.token_bytes(),
                            precision=choose_precision(config, config.capabilities()), ranks=ctx)
    metrics.update(test_loss=result["loss"], test_bits_per_byte=result["bits_per_byte"], test_tokens=result["tokens"],
                   test_documents=len(docs))
    log(f"  test split     bits per byte {result['bits_per_byte']:.4f} ({len(docs)} documents never trained or "
        "validated on)")
    if ctx.is_main:
        write_summary(run_dir, metrics)
    return metrics
