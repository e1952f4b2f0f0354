"""Supervised fine-tuning data: conversations rendered with the chat template, packed into training
windows, with the loss on the assistant's tokens only.

Records, one JSON object per line of a .jsonl file:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}          (one user turn, one assistant turn)
A record that is neither is refused with its line number. Each conversation is rendered as in
`chat_template` (the tokenizer's own template when it has one, else the plain `User:`/`Assistant:`
one), preceded by end-of-text and followed by it (so that the model learns to stop). The mask marks
what the model is trained to produce: each assistant message's content with its closing newline (or
the template's end-of-turn token) and the final end-of-text. Conversations are packed one after the
other; the windows carry document ids, so no token attends across conversations.
Conversations are split into train/val by a seeded shuffle (val_fraction, split_seed), like documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .chat_template import ROLES, ChatFormatError, check_messages, has_own_template, render_plain
from .corpus import TokenizedCorpus
from .sources import jsonl_records
from .tokenizer import Tokenizer, load_tokenizer, train_bpe

IGNORE = -100


def read_conversations(path: str | Path) -> list[list[dict]]:
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise DataError(f"--task sft needs a .jsonl file of conversations, got {path}")
    conversations = []
    for n, record in jsonl_records(path):
        try:
            if isinstance(record, dict) and "messages" in record:
                messages = check_messages(record["messages"])
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(
                    record.get("completion"), str):
                messages = [{"role": "user", "content": record["prompt"]},
                            {"role": "assistant", "content": record["completion"]}]
            else:
                raise ChatFormatError('a record is {"messages": [...]} or {"prompt": ..., "completion": ...}')
            if not any(m["role"] == "assistant" for m in messages):
                raise ChatFormatError("the conversation has no assistant message to learn from")
        except ChatFormatError as exc:
            raise DataError(f"{path}:{n}: {exc}") from None
        conversations.append(messages)
    if len(conversations) < 2:
        raise DataError(f"{path} holds {len(conversations)} conversation(s); need at least 2 (train and val)")
    return conversations


def encode_conversation(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask): mask 1 on the tokens the model learns to produce."""
    if has_own_template(tokenizer):
        return _encode_with_own_template(messages, tokenizer)
    ids, mask = [tokenizer.eot_id], [0]
    for m in messages:
        head = tokenizer.encode(f"{ROLES[m['role']]}:")
        body = tokenizer.encode(f" {m['content'].strip()}\n")
        learn = int(m["role"] == "assistant")
        ids += head + body
        mask += [0] * len(head) + [learn] * len(body)
    return ids + [tokenizer.eot_id], mask + [1]


def _encode_with_own_template(messages, tokenizer):
    """Render with the tokenizer's template, then mark the tokens inside each assistant message's content
    and the one token right after it (the template's end-of-turn marker)."""
    auto = tokenizer.auto
    text = auto.apply_chat_template(messages, tokenize=False)
    spans, at = [], 0
    for m in messages:
        start = text.find(m["content"], at)
        if start < 0:
            raise DataError("the tokenizer's chat template changes message contents; cannot mask them")
        at = start + len(m["content"])
        if m["role"] == "assistant":
            spans.append((start, at))
    enc = auto(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    mask = [int(any(a < end and b > start for start, end in spans)) for a, b in offsets]
    for _, end in spans:  # the first token that starts at or after the content's end
        following = next((k for k, (a, _) in enumerate(offsets) if a >= end), None)
        if following is not None:
            mask[following] = 1
    return list(enc["input_ids"]) + [tokenizer.eot_id], mask + [1]


@dataclass
class SFTCorpus(TokenizedCorpus):
    train_mask: np.ndarray = None
    val_mask: np.ndarray = None


def _pack(encoded: list[tuple[list[int], list[int]]]):
    ids, mask, starts = [], [], []
    for i, m in encoded:
        starts.append(len(ids))
        ids += i
        mask += m
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8), np.asarray(starts, dtype=np.int64)


def load_sft_data(config, log=print) -> tuple[Tokenizer, SFTCorpus]:
    conversations = read_conversations(config.dataset)
    order = list(range(len(conversations)))
    random.Random(config.split_seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(config.val_fraction * len(order))))
    val = [conversations[i] for i in sorted(order[:n_val])]
    train = [conversations[i] for i in sorted(order[n_val:])]
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        tokenizer = train_bpe([render_plain(c, add_generation_prompt=False) for c in train], config.vocab_size)
    train_ids, train_mask, train_starts = _pack([encode_conversation(c, tokenizer) for c in train])
    val_ids, val_mask, val_starts = _pack([encode_conversation(c, tokenizer) for c in val])
    log(f"SFT data: {len(train)} train / {len(val)} val conversations, {len(train_ids):,} / {len(val_ids):,} "
        f"tokens, {int(train_mask.sum()):,} train tokens learned")
    corpus = SFTCorpus(train_ids, val_ids, train_starts, val_starts, tokenizer.eot_id, tokenizer.token_bytes(),
                       meta={"task": "sft"}, train_mask=train_mask, val_mask=val_mask)
    return tokenizer, corpus


class SFTDataset:
    """Packed windows over the conversations; targets outside the mask are IGNORE; document ids per position."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, doc_starts: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the conversations hold {len(tokens)} tokens, fewer than one window of {seq_len + 1}; "
                            "use more data or a smaller --seq-len")
        self.tokens, self.mask, self.doc_starts, self.seq_len = tokens, mask, doc_starts, seq_len
        self.starts = np.arange(0, len(tokens) - seq_len, seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        x = self.tokens[s:s + self.seq_len].astype(np.int64)
        y = np.where(self.mask[s + 1:s + self.seq_len + 1] > 0, self.tokens[s + 1:s + self.seq_len + 1], IGNORE)
        doc_ids = np.searchsorted(self.doc_starts, np.arange(s, s + self.seq_len), side="right") - 1
        # a target that opens a new conversation is predicted across the boundary: not learned
        first = np.isin(np.arange(s + 1, s + self.seq_len + 1), self.doc_starts)
        y = np.where(first, IGNORE, y).astype(np.int64)
        return x, y, doc_ids.astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        pass
