"""The one data path of a run: `open_corpus` opens its corpus, whatever its size, as token-store shards, and
the loaders cut windows from them and batch them (sharded_loader.ShardedLoader, the one loader).

  a fine-tuning set (--task sft)      one shard in memory: the conversations with their loss masks (sft.py)
  a small corpus                       one shard in the data cache (corpus.py, load_and_cache_data)
  a large source, a store, a mixture   the stores `blueberry prepare` writes (stores.py)
Every split of every shard is cut the same way (`window_cut`): training windows by --dataset-type, held-out
windows packed (document windows scored once under --dataset-type document), masked conversations where the
shard has a loss mask; with --document-mask each window carries its document ids.
"""

from __future__ import annotations

from ..errors import UsageError
from .dataset import create_dataset
from .sharded_loader import EvalConcat, MixtureLoader, Prefetched, ShardedLoader, window_sets
from .stores import open_stores, prepare_stores, uses_token_store
from .token_store import Shard, has_split


def open_corpus(config, tokenizer=None):
    """(tokenizer, corpus) of the run; `tokenizer` (a trained run's own) is used for fine-tuning data.
    Token stores are prepared (or found) here: under torchrun rank 0 calls this first."""
    if config.data.task == "sft":
        from .sft import load_sft_data

        return load_sft_data(config, tokenizer=tokenizer)
    if uses_token_store(config):
        stores = prepare_stores(config)
        if config.data.test_fraction > 0:
            for _, store, _ in stores:
                if not has_split(store, "test"):
                    raise UsageError(f"--test-fraction: the token store {store} was prepared without a test split; "
                                     "prepare it with --test-fraction, or drop the flag")
        return open_stores(stores)
    from .corpus import load_and_cache_data

    _, tokenizer, corpus = load_and_cache_data(config)
    return tokenizer, corpus


def window_cut(config, split: str):
    """How the windows of one split's shard are cut: a function Shard -> window set."""
    seq_len, mask = config.model.max_seq_len, config.data.document_mask

    def cut(shard: Shard):
        if shard.mask is not None:
            from .sft import SFTDataset

            return SFTDataset(shard.tokens, shard.mask, shard.doc_starts, seq_len)
        if split == "train":
            return create_dataset(shard.tokens, config.data.dataset_type, seq_len, stride=config.data.stride,
                                  doc_starts=shard.doc_starts, document_mask=mask, seed=config.training.seed)
        if config.data.dataset_type == "document":
            return create_dataset(shard.tokens, "document", seq_len, doc_starts=shard.doc_starts, document_mask=mask,
                                  score_once=True)
        return create_dataset(shard.tokens, "packed", seq_len, doc_starts=shard.doc_starts, document_mask=mask)
    return cut


def create_dataloaders(config, corpus, rank: int = 0, world_size: int = 1):
    """Training loader (one source, or a mixture), read ahead by a thread; validation loader."""
    seq_len, batch, seed = config.model.max_seq_len, config.training.batch_size, config.training.seed
    cut, by_source = window_cut(config, "train"), corpus.shards("train")
    if len(by_source) == 1:
        (shards,) = by_source.values()
        train = ShardedLoader(window_sets(shards, cut, seq_len), batch, seed=seed, rank=rank, world_size=world_size)
    else:
        parts = {source: ShardedLoader(window_sets(shards, cut, seq_len), 1, seed=seed + i, rank=rank,
                                       world_size=world_size)
                 for i, (source, shards) in enumerate(by_source.items())}
        train = MixtureLoader(parts, corpus.weights, batch, seed=seed, rank=rank)
    if config.data.prefetch > 0:
        train = Prefetched(train, config.data.prefetch)
    return train, held_out_loader(config, corpus, "val", config.training.eval_batches, rank, world_size)


def held_out_loader(config, corpus, split: str, max_batches: int | None, rank: int = 0, world_size: int = 1):
    """A held-out split's windows in order, every rank its share (the first `max_batches` batches; all when
    None); several sources in turn, each its weight's share of the batches."""
    by_source, weights = corpus.shards(split), corpus.weights
    total = sum(weights.values())
    loaders = []
    for source, shards in by_source.items():
        share = max_batches if len(by_source) == 1 or max_batches is None else max(
            1, round(max_batches * weights[source] / total))
        parts = window_sets(shards, window_cut(config, split), config.model.max_seq_len)
        batch = max(1, min(config.training.batch_size, sum(len(p) for p in parts) // world_size))
        loaders.append(ShardedLoader(parts, batch, shuffle=False, max_batches=share, rank=rank, world_size=world_size))
    return loaders[0] if len(loaders) == 1 else EvalConcat(loaders)


def first_shard(corpus, split: str) -> Shard:
    """The first source's first shard of `split` (sample prompts, held-out texts)."""
    return next(iter(corpus.shards(split).values()))[0]


def split_tokens(corpus, split: str) -> int:
    return sum(len(s.tokens) for shards in corpus.shards(split).values() for s in shards)
