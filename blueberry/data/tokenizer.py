"""Tokenizers behind one small interface: a byte-level BPE trained here, or an existing one.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (trained here, or loaded from a tokenizer.json);
`TransformersTokenizer` wraps `transformers.AutoTokenizer` for a local directory. Both give batch
encoding, decoding, the end-of-text id, the id a prompt starts with (`prefix_id`: bos when the tokenizer
has one), a hash of the tokenizer's content (`content_id`: equal for the same tokenizer read from two
places) and, for bits per byte, how many UTF-8 bytes each id stands for.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ..errors import DataError

EOT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, hf_tokenizer, identity: str):
        self.hf = hf_tokenizer
        self.identity = identity
        eot = self.hf.token_to_id(EOT)
        self.eot_id = eot if eot is not None else self.hf.get_vocab_size() - 1

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def prefix_id(self) -> int:
        """The token every prompt starts with: the beginning-of-sequence token when the tokenizer has one
        (an imported model's), else end-of-text, which opens every document in training. It is lm-eval's
        `prefix_token_id` (bos, else eos)."""
        return self.eot_id

    @property
    def content_id(self) -> str:
        """A hash of what the tokenizer does (vocabulary, merges, normalisation, special tokens), whatever
        file or directory it was read from: two runs share a tokenizer when their content_id are equal."""
        return hashlib.sha256(self._content().encode("utf-8")).hexdigest()[:16]

    def _content(self) -> str:
        spec = json.loads(self.hf.to_str())
        for setting in ("truncation", "padding"):  # settings of a call, not the tokenizer's content
            spec.pop(setting, None)
        return json.dumps({"tokenizer": spec, "eot": self.eot_id, "prefix": self.prefix_id}, sort_keys=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte count of each id (0 for special tokens), for bits per byte."""
        special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        tokens = [self.hf.id_to_token(i) for i in range(self.vocab_size)]
        return count_token_bytes(tokens, special, _is_byte_level(self.hf))

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))


class TransformersTokenizer(Tokenizer):
    """A tokenizer directory loadable by `transformers.AutoTokenizer` (local files only)."""

    def __init__(self, auto_tokenizer, identity: str):
        self.auto = auto_tokenizer
        self.hf = auto_tokenizer.backend_tokenizer if hasattr(auto_tokenizer, "backend_tokenizer") else None
        self.identity = identity
        eos = auto_tokenizer.eos_token_id
        self.eot_id = eos if eos is not None else len(auto_tokenizer) - 1

    @property
    def vocab_size(self) -> int:
        return len(self.auto)

    @property
    def prefix_id(self) -> int:
        bos = self.auto.bos_token_id
        return bos if bos is not None else self.eot_id

    def _content(self) -> str:
        if self.hf is not None:
            spec = json.loads(super()._content())
        else:  # a slow tokenizer: its vocabulary
            spec = {"vocab": sorted(self.auto.get_vocab().items()), "eot": self.eot_id, "prefix": self.prefix_id}
        spec["special"] = {k: str(v) for k, v in sorted(self.auto.special_tokens_map.items())}
        return json.dumps(spec, sort_keys=True)

    def encode(self, text: str) -> list[int]:
        return self.auto.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.auto(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.auto.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, read from the vocabulary itself: decoding one id alone would
        turn a token that holds part of a multi-byte character into U+FFFD (3 bytes)."""
        tokens = self.auto.convert_ids_to_tokens(list(range(self.vocab_size)))
        special = set(self.auto.all_special_tokens) | set(getattr(self.auto, "added_tokens_encoder", {}))
        byte_level = self.hf is not None and _is_byte_level(self.hf)
        return count_token_bytes(tokens, special, byte_level)

    def save(self, path: str | Path) -> None:
        self.auto.save_pretrained(str(Path(path).parent / "hf_tokenizer"))
        if self.hf is not None:
            self.hf.save(str(path))


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece's byte tokens


def count_token_bytes(tokens: list[str | None], special: set[str], byte_level: bool) -> np.ndarray:
    """How many UTF-8 bytes each vocabulary string stands for. Byte-level BPE (GPT-2 style): one character
    per byte. SentencePiece style: `<0xAB>` is one byte, `▁` a space, the rest their UTF-8 encoding.
    Special tokens (end-of-text, chat markers) stand for no bytes."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    out = np.zeros(len(tokens), dtype=np.int64)
    for i, token in enumerate(tokens):
        if token is None or token in special:
            continue
        if byte_level and all(ch in alphabet for ch in token):
            out[i] = len(token)
        elif _BYTE_FALLBACK.match(token):
            out[i] = 1
        else:
            out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return out


def _is_byte_level(hf_tokenizer) -> bool:
    """True when the tokenizer's decoder maps characters back to bytes one for one (GPT-2 byte level)."""
    spec = json.loads(hf_tokenizer.to_str())
    return "ByteLevel" in json.dumps(spec.get("decoder"))


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts`, with the end-of-text token as id vocab_size - 1 at most."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return Tokenizer(tok, identity=f"bpe:{vocab_size}:{fingerprint_texts(texts)}")


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer.json file, or a local directory for `transformers.AutoTokenizer`."""
    path = Path(spec)
    if path.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise DataError(f"--tokenizer {spec}: not a valid tokenizer.json ({exc})") from None
        return Tokenizer(hf, identity=f"file:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}")
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise DataError(f"--tokenizer {spec}: cannot be loaded offline ({type(exc).__name__}). Give a "
                        "tokenizer.json file or a local directory saved with save_pretrained()") from None
    digest = ""
    if path.is_dir():
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.glob("*")) if p.is_file())).hexdigest()[:16]
    return TransformersTokenizer(auto, identity=f"auto:{spec}:{digest}")


def fingerprint_texts(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
