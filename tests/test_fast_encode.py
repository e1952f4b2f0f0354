"""tiktoken runs our byte-level BPE with exactly `tokenizers`' ids (data/fast_encode.py): a BPE trained in the
test on mixed-script text, encoded both ways on fresh random strings of many scripts, emoji (with joiners and
skin tones), combining marks, replacement characters from invalid UTF-8, whitespace runs, contractions,
digits and the end-of-text token written in the text; a tokenizer it cannot reproduce is left alone."""

from __future__ import annotations

import random

import pytest

from blueberry.data import train_bpe
from blueberry.data.fast_encode import fast_encoder, tiktoken_encoding

pytest.importorskip("tiktoken")

ALPHABETS = [(0x20, 0x7E), (0xC0, 0x17F), (0x391, 0x3C9), (0x410, 0x44F), (0x5D0, 0x5EA), (0x627, 0x64A),
             (0x4E00, 0x4FFF), (0x3040, 0x309F), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF)]
EXTRAS = ["\u200d", "\u0301", "\ufe0f", "\U0001f3fd", "\ufffd", "\n", "\t", "  ", "'s", "'ll", "n't", "<|endoftext|>"]


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(rng.choice(EXTRAS))
        else:
            lo, hi = rng.choice(ALPHABETS)
            out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        out.append(rng.choice([" ", " ", "", "\n", ", ", ". "]))
    return "".join(out)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    corpus = [random_text(rng, 400) for _ in range(40)]
    corpus.append(b"bytes \xff\xfe not \xc3\x28 UTF-8 \xe2\x82".decode("utf-8", errors="replace") * 20)
    return train_bpe(corpus, 1024)


def test_tiktoken_ids_equal_tokenizers_ids(tokenizer):
    rng = random.Random()  # fresh strings every run
    texts = [random_text(rng, rng.randint(1, 200)) for _ in range(300)]
    texts += ["", " ", "\n\n\n", "   leading and trailing   ", "<|endoftext|>", "a<|endoftext|>b",
              "invalid \xff".encode("latin-1").decode("utf-8", errors="replace"), "👩‍👩‍👧‍👦 🏳️‍🌈 e\u0301"]
    encode = fast_encoder(tokenizer, texts[:5])
    assert encode is not None
    assert encode(texts) == tokenizer.encode_batch(texts)
    assert tokenizer.eot_id in encode(["x<|endoftext|>y"])[0]


def test_a_tokenizer_tiktoken_cannot_reproduce_is_left_alone(tokenizer):
    from tokenizers import Tokenizer as HFTokenizer, normalizers

    from blueberry.data.tokenizer import Tokenizer

    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    hf.normalizer = normalizers.NFKC()
    assert tiktoken_encoding(hf) is None
    assert fast_encoder(Tokenizer(hf, identity="nfkc"), ["x"]) is None


def test_prepare_workers_encode_through_tiktoken_with_the_same_ids(tokenizer, tmp_path):
    from blueberry.data import prepare

    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    prepare._init_worker(str(path))
    texts = [random_text(random.Random(7), 50) for _ in range(20)]
    ids = prepare._encode(texts)
    assert getattr(prepare._WORKER_ENCODE, "__name__", "") == "encode_batch"
    assert getattr(prepare._WORKER_ENCODE, "__self__", None) is None  # tiktoken's closure, not the tokenizer's method
    assert [list(a) for a in ids] == tokenizer.encode_batch(texts)


def test_a_vocabulary_missing_a_byte_is_left_to_tokenizers():
    """tiktoken panics (a BaseException) on a byte with no token, where the sample texts had none of it."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from blueberry.data.tokenizer import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["hello world " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False))  # no initial_alphabet
    assert tiktoken_encoding(hf) is None
    assert fast_encoder(Tokenizer(hf, identity="partial"), ["hello world"]) is None


def test_added_tokens_tiktoken_would_not_match_like_tokenizers_are_left_alone(tokenizer):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    for token in (AddedToken("<|user|>", special=False), AddedToken("<|sep|>", special=True, lstrip=True)):
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
        hf.add_tokens([token])
        assert tiktoken_encoding(hf) is None, token
