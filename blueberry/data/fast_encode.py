"""Encoding at corpus scale: our byte-level BPE run by tiktoken, as nanochat does.

The tokenizer trained here (`train_bpe`: byte-level BPE, GPT-2's pre-tokenizer regex, no normalizer, the
end-of-text token) is the same function as a tiktoken `Encoding` built from it: tiktoken splits the text
with the same regex, maps each piece to bytes and merges the adjacent pair whose union has the lowest
rank, where a token's rank is its id — and a BPE trainer gives ids in merge order. tiktoken's merge loop is
several times faster per thread than `tokenizers`' (`python benchmarks/tokenize_speed.py`). The ids are
the tokenizer's own: `fast_encoder` builds the tiktoken encoding only for a tokenizer of exactly that shape
and checks it against `tokenizers` on sample texts before it is used; anything else (an imported
tokenizer, a normalizer, another pre-tokenizer, tiktoken not installed) keeps `tokenizers`.
"""

from __future__ import annotations

import json
from typing import Callable

# GPT-2's pre-tokenizer regex (the one `tokenizers`' ByteLevel(use_regex=True) applies)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable characters map (what byte-level vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _convertible(spec: dict) -> bool:
    """A plain byte-level BPE with GPT-2's regex: what tiktoken computes identically."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    # added tokens: tiktoken knows special ones only, matched exactly (no stripping of the spaces around)
    plain_added = all(t.get("special") and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
                      for t in spec.get("added_tokens", []))
    return (plain_added and model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
            and not model.get("ignore_merges") and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


def tiktoken_encoding(hf_tokenizer):
    """The tiktoken Encoding equal to `hf_tokenizer` (a `tokenizers.Tokenizer`), or None when there is none."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(hf_tokenizer.to_str())
    if not _convertible(spec):
        return None
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    decode = _byte_decoder()
    ranks = {}
    for token, rank in spec["model"]["vocab"].items():
        if token in special:
            continue
        try:
            ranks[bytes(decode[ch] for ch in token)] = rank
        except KeyError:
            return None  # a vocabulary string outside the byte alphabet: not plain byte-level
    if any(bytes([b]) not in ranks for b in range(256)):
        return None  # tiktoken panics (a BaseException) on a byte with no token; tokenizers drops it
    return tiktoken.Encoding(name="blueberry-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def fast_encoder(tokenizer, sample_texts: list[str]) -> Callable[[list[str]], list[list[int]]] | None:
    """A batch encoder through tiktoken giving exactly `tokenizer.encode_batch`'s ids on `sample_texts`,
    or None (use `tokenizer.encode_batch`)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or getattr(tokenizer, "auto", None) is not None:
        return None  # an imported (transformers) tokenizer keeps its own encoder
    encoding = tiktoken_encoding(hf)
    if encoding is None:
        return None

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [encoding.encode(t, allowed_special="all") for t in texts]

    if encode_batch(sample_texts) != tokenizer.encode_batch(sample_texts):
        return None
    return encode_batch
