"""A tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary inside a GGUF file.

What llama.cpp needs to split text exactly as we do: every token string by id (ids beyond the tokenizer
padded as unused `[PAD<id>]`), its type (control for special tokens, user-defined for other added
tokens), the merges in rank order, and `tokenizer.ggml.pre`, the name of llama.cpp's pre-tokenizer whose
regex is ours. Known splits: GPT-2's (a byte-level BPE trained here), Llama 3's and Qwen2's (imported
tokenizers). Anything else (another regex, a normalizer, byte fallback, a SentencePiece model) is
refused with the reason, since llama.cpp would tokenize differently.
"""

from __future__ import annotations

import json

from .refusals import ExportError

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json `spec` (ExportError when it has none)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        name = "gpt-2"
    else:
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        split = steps[0] if len(steps) == 2 and steps[0].get("type") == "Split" else {}
        byte_level = steps[1] if len(steps) == 2 else {}
        pattern = (split.get("pattern") or {}).get("Regex")
        if (byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
                or byte_level.get("add_prefix_space") or split.get("behavior") != "Isolated" or split.get("invert")
                or pattern not in KNOWN_SPLITS):
            raise ExportError(f"pre_tokenizer {json.dumps(pre)[:120]}: not a split llama.cpp knows (GPT-2, Llama 3 "
                              "or Qwen2 byte-level BPE), so it would tokenize differently")
        name = KNOWN_SPLITS[pattern]
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC") or (normalizer == "NFC" and name != "qwen2"):
        raise ExportError(f"normalizer {normalizer}: llama.cpp applies no normalizer to a {name} vocabulary")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ExportError(f"tokenizer model {model.get('type')}: GGUF export needs a plain byte-level BPE")
    if bool(model.get("ignore_merges")) != (name == "llama-bpe"):
        raise ExportError(f"ignore_merges={model.get('ignore_merges')}: llama.cpp's {name} pre-tokenizer "
                          f"{'ignores' if name == 'llama-bpe' else 'applies'} the merges of whole-word tokens")
    return name


def vocab_entries(spec: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tokenizer.json `spec` for a model of `vocab_size` ids."""
    from gguf import TokenType

    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"vocab_size={vocab_size}: the tokenizer has ids up to {max(by_id)}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [int(types.get(i, TokenType.NORMAL if i in by_id else TokenType.UNUSED)) for i in range(vocab_size)]
    merges = []
    for merge in spec["model"].get("merges", []):
        pair = merge if isinstance(merge, list) else merge.split(" ")
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ExportError(f"merge {merge!r}: llama.cpp stores merges as 'left right' and cannot hold this one")
        merges.append(" ".join(pair))
    return tokens, token_types, merges


def add_vocab(writer, tokenizer, vocab_size: int, chat_template: str | None = None) -> None:
    """The tokenizer's vocabulary, special ids and chat template, as llama.cpp reads them."""
    from ..data.chat_template import jinja_chat_template

    if tokenizer.hf is None:
        raise ExportError("the tokenizer is a slow (Python) tokenizer with no tokenizer.json; GGUF export needs one")
    spec = json.loads(tokenizer.hf.to_str())
    pre = pre_tokenizer_name(spec)
    tokens, token_types, merges = vocab_entries(spec, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.prefix_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(True)  # every prompt of ours starts with the prefix token
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template or jinja_chat_template(tokenizer))
