"""The held-out data of a trained run, made again from its config and read with the run's own tokenizer:
what `eval` and `quantize` score, whatever kind of run it is: the validation windows of its corpus
(loaders.open_corpus: a fine-tuning set, a small corpus's cached store, token stores), as training scored
them. The held-out texts (`held_out_texts`, for greedy-continuation metrics) are the first source's
validation documents decoded, or for fine-tuning its validation conversations rendered with the plain
`User:`/`Assistant:` template (`render_plain`, whatever template the tokenizer has).
"""

from __future__ import annotations

from ..logs import quiet
from .loaders import first_shard, held_out_loader, open_corpus


def validation_loader(config, tokenizer, max_batches: int | None):
    """The run's validation batches in order (the first `max_batches`; all when None)."""
    with quiet():
        _, corpus = open_corpus(config, tokenizer)
    return held_out_loader(config, corpus, "val", max_batches)


def held_out_texts(config, tokenizer, limit: int = 500) -> list[str]:
    """Texts the run never trained on (at most `limit`)."""
    if config.data.task == "sft":
        from .chat_template import render_plain
        from .sft import split_conversations

        _, val = split_conversations(config)
        return [render_plain(messages, add_generation_prompt=False) for _, messages in val[:limit]]
    with quiet():
        _, corpus = open_corpus(config, tokenizer)
    shard = first_shard(corpus, "val")
    starts = [int(s) for s in shard.doc_starts[:limit + 1]] + [len(shard.tokens)]
    return [tokenizer.decode(shard.tokens[a:b]) for a, b in zip(starts, starts[1:])][:limit]
