"""Supervised fine-tuning data: conversations rendered with the chat template, packed into training
windows, with the loss on the assistant's tokens only.

Records, one JSON object per line of a .jsonl file:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}          (one user turn, one assistant turn)
A record that is neither, or one the chat template refuses, is refused with its file and line number.
Each conversation is rendered as in `chat_template` (the tokenizer's own template when it has one, else
the plain `User:`/`Assistant:` one, preceded by the tokenizer's `prefix_id`: bos, else end-of-text) and
followed by end-of-text (so that the model learns to stop). The mask marks what the model is trained to
produce: each assistant message's content with its closing newline (or the template's end-of-turn token)
and the final end-of-text; with a template that trims contents (Llama 3's `| trim`) each assistant content
is found, trimmed, where its turn opens. Conversations are packed one after the other; the windows carry
document ids, so no token attends across conversations.
Conversations are split into train/val by a seeded shuffle (val_fraction, split_seed), like documents.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..logs import get_logger
from .chat_template import ROLES, ChatFormatError, check_messages, has_own_template, is_template_error, render_plain
from .corpus import TokenizedCorpus
from .sources import jsonl_records
from .tokenizer import Tokenizer, load_tokenizer, train_bpe

log = get_logger(__name__).info

IGNORE = -100


def read_conversations(path: str | Path) -> list[list[dict]]:
    return [messages for _, messages in read_numbered_conversations(path)]


def read_numbered_conversations(path: str | Path) -> list[tuple[int, list[dict]]]:
    """[(line number, messages)] of a .jsonl file of conversations; a bad record is refused with its line."""
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
        conversations.append((n, messages))
    if len(conversations) < 2:
        raise DataError(f"{path} holds {len(conversations)} conversation(s); need at least 2 (train and val)")
    return conversations


def encode_conversation(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask): mask 1 on the tokens the model learns to produce."""
    if has_own_template(tokenizer):
        return _encode_with_own_template(messages, tokenizer)
    ids, mask = [tokenizer.prefix_id], [0]  # as chat_prompt_ids starts the server's prompt
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
    spans = _assistant_spans(messages, auto, text)
    enc = auto(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    mask = [int(any(a < end and b > start for start, end in spans)) for a, b in offsets]
    for _, end in spans:  # the first token that starts at or after the content's end
        following = next((k for k, (a, _) in enumerate(offsets) if a >= end), None)
        if following is not None:
            mask[following] = 1
    return list(enc["input_ids"]) + [tokenizer.eot_id], mask + [1]


def _assistant_spans(messages, auto, text: str) -> list[tuple[int, int]]:
    """(start, end) in `text` of each assistant message's content. The search starts where the template's
    rendering of the conversation so far, with the generation prompt, ends (the assistant's turn opens
    there), and finds the content as it is or, for templates that trim it (Llama 3's `| trim`), stripped."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        at = spans[-1][1] if spans else 0
        if i:
            prompt = auto.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            at = len(prompt) if text.startswith(prompt) else at
        candidates = [c for c in (m["content"], m["content"].strip()) if c]
        # the earliest match (the longer one at a tie): the content as is may also occur in a later message
        found = sorted((text.find(c, at), -len(c), c) for c in candidates if text.find(c, at) >= 0)
        if candidates and not found:
            raise ChatFormatError(f"the tokenizer's chat template changes the content of message {i} beyond "
                                  "trimming it; cannot find it to mask it")
        start, content = (found[0][0], found[0][2]) if found else (at, "")
        spans.append((start, start + len(content)))
    return spans


def _encode_all(numbered: list[tuple[int, list[dict]]], tokenizer, path) -> list[tuple[list[int], list[int]]]:
    """encode_conversation of each; a conversation the template refuses is named by file and line."""
    out = []
    for n, messages in numbered:
        try:
            out.append(encode_conversation(messages, tokenizer))
        except (ChatFormatError, DataError) as exc:
            raise DataError(f"{path}:{n}: {exc}") from None
        except Exception as exc:  # the template's own raise_exception (jinja2), or a template that fails
            if not is_template_error(exc):
                raise
            raise DataError(f"{path}:{n}: the chat template refused the conversation: {exc}") from None
    return out


def _pack(encoded: list[tuple[list[int], list[int]]]):
    ids, mask, starts = [], [], []
    for i, m in encoded:
        starts.append(len(ids))
        ids += i
        mask += m
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8), np.asarray(starts, dtype=np.int64)


def split_conversations(config) -> tuple[list[tuple[int, list[dict]]], list[tuple[int, list[dict]]]]:
    """(train, val) numbered conversations of config.data.dataset, split by a seeded shuffle (split_seed)."""
    conversations = read_numbered_conversations(config.data.dataset)
    order = list(range(len(conversations)))
    random.Random(config.data.split_seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(config.data.val_fraction * len(order))))
    return ([conversations[i] for i in sorted(order[n_val:])], [conversations[i] for i in sorted(order[:n_val])])


def load_sft_data(config, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenizedCorpus]:
    """Tokenizer and packed conversations of config.data.dataset; `tokenizer` (a trained run's) is used as it is,
    else --tokenizer, else a BPE trained on the training conversations."""
    train, val = split_conversations(config)
    if tokenizer is None and config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
    elif tokenizer is None:
        tokenizer = train_bpe([render_plain(c, add_generation_prompt=False) for _, c in train], config.model.vocab_size)
    train_ids, train_mask, train_starts = _pack(_encode_all(train, tokenizer, config.data.dataset))
    val_ids, val_mask, val_starts = _pack(_encode_all(val, tokenizer, config.data.dataset))
    log(f"SFT data: {len(train)} train / {len(val)} val conversations, {len(train_ids):,} / {len(val_ids):,} "
        f"tokens, {int(train_mask.sum()):,} train tokens learned")
    corpus = TokenizedCorpus(train_ids, val_ids, train_starts, val_starts, tokenizer.eot_id, tokenizer.token_bytes(),
                             meta={"task": "sft", "source": str(config.data.dataset)}, train_mask=train_mask,
                             val_mask=val_mask)  # a store of one shard in memory, with its loss masks
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
