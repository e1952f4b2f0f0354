"""Tokenizers behind one small interface: a byte-level BPE trained here, or an existing one.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (trained here, or loaded from a tokenizer.json);
`TransformersTokenizer` wraps `transformers.AutoTokenizer` for a local directory. Both give batch
encoding, decoding, the end-of-text id and, for bits per byte, how many UTF-8 bytes each id stands for.
"""

from __future__ import annotations

import hashlib
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

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte count of each id (0 for special tokens), for bits per byte."""
        from tokenizers.pre_tokenizers import ByteLevel

        byte_of = {ch: 1 for ch in ByteLevel.alphabet()}
        vocab = self.hf.get_vocab()
        special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            if token in special:
                continue
            if all(ch in byte_of for ch in token):  # byte-level token: one char per byte
                out[i] = len(token)
            else:
                out[i] = len(self.hf.decode([i]).encode("utf-8"))
        return out

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

    def encode(self, text: str) -> list[int]:
        return self.auto.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.auto(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.auto.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        special = set(self.auto.all_special_ids)
        return np.array([0 if i in special else len(self.auto.decode([i]).encode("utf-8"))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def save(self, path: str | Path) -> None:
        self.auto.save_pretrained(str(Path(path).parent / "hf_tokenizer"))
        if self.hf is not None:
            self.hf.save(str(path))


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
