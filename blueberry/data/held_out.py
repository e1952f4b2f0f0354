"""The held-out data of a trained run, made again from its config and read with the run's own tokenizer:
what `eval` and `quantize` score, whatever kind of run it is.

  a pretraining run on an in-memory corpus   its validation documents (the data cache), packed windows
  a fine-tuning run (--task sft)             its validation conversations, the loss on the assistant's tokens
  a run on token stores or a mixture         every store's validation shards, as training scored them
The held-out texts (`held_out_texts`, for greedy-continuation metrics) are those documents, those
conversations rendered with the plain `User:`/`Assistant:` template (`render_plain`, whatever template the
tokenizer has), or the first store's validation documents decoded.
"""

from __future__ import annotations

from ..logs import quiet
from . import BatchLoader, create_dataset, load_and_cache_data
from .stores import uses_token_store


def validation_loader(config, tokenizer, max_batches: int | None):
    """The run's validation batches in order (the first `max_batches`; all when None)."""
    if config.data.task == "sft":
        from .sft import SFTDataset, load_sft_data

        with quiet():
            _, corpus = load_sft_data(config, tokenizer=tokenizer)
        dataset = SFTDataset(corpus.val, corpus.val_mask, corpus.val_doc_starts, config.model.max_seq_len)
    elif uses_token_store(config):  # their validation shards, never the sources again
        from .sharded_loader import EvalConcat
        from .stores import prepare_stores
        from .stores import validation_loader as store_loader

        with quiet():
            stores = prepare_stores(config)
        loaders = [store_loader(store, config, max_batches) for _, store, _ in stores]
        return loaders[0] if len(loaders) == 1 else EvalConcat(loaders)
    else:
        with quiet():
            _, _, corpus = load_and_cache_data(config)
        dataset = create_dataset(corpus.val, "packed", config.model.max_seq_len)
    return BatchLoader(dataset, min(config.training.batch_size, len(dataset)), shuffle=False, max_batches=max_batches)


def held_out_texts(config, tokenizer, limit: int = 500) -> list[str]:
    """Texts the run never trained on (at most `limit`)."""
    if config.data.task == "sft":
        from .chat_template import render_plain
        from .sft import split_conversations

        _, val = split_conversations(config)
        return [render_plain(messages, add_generation_prompt=False) for _, messages in val[:limit]]
    if uses_token_store(config):
        from .stores import prepare_stores
        from .token_store import open_split

        with quiet():
            stores = prepare_stores(config)
        shard = open_split(stores[0][1], "val")[0]
        starts = [int(s) for s in shard.doc_starts[:limit + 1]] + [len(shard.tokens)]
        return [tokenizer.decode(shard.tokens[a:b]) for a, b in zip(starts, starts[1:])][:limit]
    from .corpus import split_documents
    from .sources import load_documents

    data = config.data
    _, val = split_documents(load_documents(data.dataset, data.text_field), data.val_fraction, data.split_seed)
    return [d.text for d in val[:limit]]
