"""The test split (--test-fraction): documents held out of training and validation, scored once when a
run ends, so that choices made by watching the validation bits per byte (a recipe search) can be checked
on text nothing was tuned on. Added to summary.json as test_loss / test_bits_per_byte."""

from __future__ import annotations

from pathlib import Path

from ..data.loaders import held_out_loader, open_corpus
from ..logs import get_logger, quiet
from ..runs.layout import write_summary
from .evaluation import evaluate_model
from .precision import choose_precision

log = get_logger(__name__).info


def held_out_test_loader(config, tokenizer, rank: int = 0, world_size: int = 1, corpus=None) -> tuple[object, int]:
    """(a loader over every window of the run's test split, this rank's share; how many documents it holds).
    The split is the corpus's own (its token store's test shards): made with the train and val splits. A
    training run passes the corpus it opened; otherwise it is opened again (a cache hit)."""
    if corpus is None:
        with quiet():  # the corpus was announced when the run read it
            _, corpus = open_corpus(config, tokenizer)
    documents = sum(len(s.doc_starts) for shards in corpus.shards("test").values() for s in shards)
    return held_out_loader(config, corpus, "test", None, rank, world_size), documents


def score_test_split(model, config, tokenizer, ctx, run_dir: Path, metrics: dict, corpus=None) -> dict:
    """Evaluate `model` (every rank takes part) on the run's test documents; updates `metrics` and the summary."""
    if config.data.test_fraction <= 0:
        return metrics
    loader, documents = held_out_test_loader(config, tokenizer, ctx.rank, ctx.world_size, corpus)
    result = evaluate_model(model, loader, config, token_bytes=tokenizer.token_bytes(),
                            precision=choose_precision(config, config.capabilities()), ranks=ctx)
    metrics.update(test_loss=result["loss"], test_bits_per_byte=result["bits_per_byte"], test_tokens=result["tokens"],
                   test_documents=documents)
    log(f"  test split     bits per byte {result['bits_per_byte']:.4f} ({documents} documents never trained or "
        "validated on)")
    if ctx.is_main:
        write_summary(run_dir, metrics)
    return metrics
