"""`load_and_cache_data`: documents -> document split -> tokenizer -> cached token streams.

Order of work, each step deterministic:
  1. load the documents (built-in, local files or Hugging Face), first `num_documents` of them;
  2. split whole documents into train and val with `split_seed` (a corpus of fewer than 4 documents
     is first cut into line-aligned pieces so that a split by pieces is possible);
  3. tokenizer: the one given, or a byte-level BPE trained on the training documents only (cached);
  4. encode in batches; each document is preceded by the end-of-text token; `max_tokens` caps the
     total exactly (val gets ceil(max_tokens * val_fraction) of it);
  5. write a token store of one shard (token_store.py: train, val and, with --test-fraction, test) under
     a key hashing every input of steps 1-4, checked against its checksums when read again.
The loaders read it as they read any store (sharded_loader.py): one data path for every corpus size.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..logs import get_logger
from .cache import cache_key, token_dtype
from .sources import Document, load_documents, source_identity
from .token_store import STORE_FORMAT, Shard, ShardWriter, holds_split, open_split, read_manifest, write_manifest
from .tokenizer import Tokenizer, fingerprint_texts, load_tokenizer, train_bpe

log = get_logger(__name__).info

MIN_DOCUMENTS_FOR_SPLIT = 4
PIECES_PER_SMALL_CORPUS = 20
ENCODE_BATCH = 64


@dataclass
class TokenizedCorpus:
    """A corpus small enough for memory: a token store of one shard (in the cache, or in memory for
    fine-tuning conversations, which carry their loss masks)."""
    train: np.ndarray
    val: np.ndarray
    train_doc_starts: np.ndarray
    val_doc_starts: np.ndarray
    eot_id: int
    token_bytes: np.ndarray  # UTF-8 bytes per token id, for bits per byte
    meta: dict = field(default_factory=dict)
    test: np.ndarray | None = None
    test_doc_starts: np.ndarray | None = None
    train_mask: np.ndarray | None = None  # fine-tuning: 1 on the tokens learned
    val_mask: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val)

    @property
    def val_bytes(self) -> int:
        return int(self.token_bytes[np.asarray(self.val, dtype=np.int64)].sum())

    @property
    def weights(self) -> dict[str, float]:
        return {self.meta.get("source", "corpus"): 1.0}

    def shards(self, split: str) -> dict[str, list[Shard]]:
        """{source: [its one shard of `split`]}, as a token store's (stores.StoreCorpus.shards)."""
        tokens = getattr(self, split)
        if tokens is None:
            raise DataError(f"this corpus has no {split} split: give the run a --{split}-fraction")
        return {name: [Shard(tokens, getattr(self, f"{split}_doc_starts"),
                             getattr(self, f"{split}_mask", None))] for name in self.weights}


def split_documents(docs: list[Document], val_fraction: float, seed: int,
                    test_fraction: float = 0.0) -> tuple[list[Document], list[Document]]:
    """(train, val): whole documents, shuffled with `seed`, at least one in each split. The test documents
    (`test_documents`) are left out of both; the validation set does not depend on `test_fraction`."""
    val_ids, test_ids = _held_out(len(docs), val_fraction, test_fraction, seed)
    train = [d for i, d in enumerate(docs) if i not in val_ids and i not in test_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def test_documents(docs: list[Document], val_fraction: float, seed: int, test_fraction: float) -> list[Document]:
    """The test split: documents never trained on nor validated on, scored once at the end of a run."""
    _, test_ids = _held_out(len(docs), val_fraction, test_fraction, seed)
    return [d for i, d in enumerate(docs) if i in test_ids]


def _held_out(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[set, set]:
    if n < 2 + (test_fraction > 0):
        raise DataError(f"need at least {2 + (test_fraction > 0)} documents to hold some out for validation"
                        + (" and test" if test_fraction > 0 else ""))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    n_test = min(n - 1 - n_val, max(1, round(test_fraction * n))) if test_fraction > 0 else 0
    return set(order[:n_val]), set(order[n_val:n_val + n_test])


def cut_into_pieces(docs: list[Document], pieces: int) -> list[Document]:
    """Cut each document into about `pieces` contiguous, line-aligned, non-overlapping parts."""
    out = []
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        per = max(1, math.ceil(len(lines) / pieces))
        for k in range(0, len(lines), per):
            text = "".join(lines[k:k + per])
            if text.strip():
                out.append(Document(f"{doc.name}[{k // per}]", text))
    return out


def encode_documents(tokenizer: Tokenizer, docs: list[Document], cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate [EOT] + doc tokens for each document, stopping exactly at `cap` tokens."""
    chunks, starts, total = [], [], 0
    for b in range(0, len(docs), ENCODE_BATCH):
        for ids in tokenizer.encode_batch([d.text for d in docs[b:b + ENCODE_BATCH]]):
            piece = [tokenizer.eot_id] + list(ids)
            if cap is not None and total + len(piece) > cap:
                piece = piece[: cap - total]
            if piece:
                starts.append(total)
                chunks.append(np.asarray(piece, dtype=np.int64))
                total += len(piece)
            if cap is not None and total >= cap:
                break
        if cap is not None and total >= cap:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return stream, np.asarray(starts, dtype=np.int64)


def _get_tokenizer(config, train_docs: list[Document]) -> Tokenizer:
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    texts = [d.text for d in train_docs]
    identity = f"bpe:{config.model.vocab_size}:{fingerprint_texts(texts)}"
    path = Path(config.data.cache_dir) / "tokenizers" / f"{cache_key({'tokenizer': identity})}.json"
    if path.exists():
        try:
            from tokenizers import Tokenizer as HFTokenizer

            return Tokenizer(HFTokenizer.from_file(str(path)), identity)
        except Exception:
            warnings.warn(f"cached tokenizer {path} is damaged; training it again", stacklevel=2)
    log(f"Training a byte-level BPE tokenizer (vocab {config.model.vocab_size}) on {len(texts)} training documents...")
    tok = train_bpe(texts, config.model.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(tmp)
    tmp.replace(path)
    return tok


def run_documents(config) -> list[Document]:
    """The documents a run splits: the first num_documents of the source (a corpus of fewer than
    MIN_DOCUMENTS_FOR_SPLIT cut into pieces)."""
    docs = load_documents(config.data.dataset, config.data.text_field, config.data.num_documents)
    if config.data.num_documents is not None and len(docs) < config.data.num_documents:
        log(f"Note: num_documents={config.data.num_documents} asked, the source has {len(docs)}")
    if len(docs) < MIN_DOCUMENTS_FOR_SPLIT:
        docs = cut_into_pieces(docs, PIECES_PER_SMALL_CORPUS)
        log(f"Fewer than {MIN_DOCUMENTS_FOR_SPLIT} documents: cut into {len(docs)} line-aligned pieces "
            "so that validation holds out whole pieces")
    return docs


def load_and_cache_data(config) -> tuple[list[str], Tokenizer, TokenizedCorpus]:
    """(texts, tokenizer, tokens): the documents' texts, the tokenizer, and the corpus (a one-shard token
    store in the cache)."""
    docs = run_documents(config)
    data = config.data
    train_docs, val_docs = split_documents(docs, data.val_fraction, data.split_seed, data.test_fraction)
    tokenizer = _get_tokenizer(config, train_docs)
    parts = {
        "source": source_identity(data.dataset),
        "content": fingerprint_texts(d.name + "\x01" + d.text for d in docs),
        "tokenizer": tokenizer.identity,
        "num_documents": data.num_documents,
        "max_tokens": data.max_tokens,
        "val_fraction": data.val_fraction,
        "split_seed": data.split_seed,
        "test_fraction": data.test_fraction,
        "text_field": data.text_field,
    }
    store = Path(data.cache_dir) / cache_key(parts)
    manifest = read_manifest(store)
    if manifest is not None and manifest.get("inputs") == parts and manifest.get("complete"):
        try:
            corpus = _open(store, manifest, tokenizer, verify=True)
            log(f"Data cache hit: {store}")
        except DataError as exc:
            warnings.warn(f"data cache entry damaged ({exc}); rebuilding it", stacklevel=2)
            corpus = None
    else:
        corpus = None
    if corpus is None:
        splits = {"train": train_docs, "val": val_docs}
        if data.test_fraction > 0:
            splits["test"] = test_documents(docs, data.val_fraction, data.split_seed, data.test_fraction)
        manifest = _write_store(store, tokenizer, splits, _caps(config), parts)
        corpus = _open(store, manifest, tokenizer, verify=False)
    info = corpus.meta
    log(f"Data: {info['n_train_documents']} train / {info['n_val_documents']} val documents, "
        f"{info['n_train']:,} train / {info['n_val']:,} val tokens, vocab {tokenizer.vocab_size}")
    return [d.text for d in docs], tokenizer, corpus


def _caps(config) -> dict[str, int | None]:
    """Tokens per split: max_tokens exactly, the validation split ceil(max_tokens * val_fraction) of it."""
    if config.data.max_tokens is None:
        return {}
    val = max(1, math.ceil(config.data.max_tokens * config.data.val_fraction))
    return {"train": config.data.max_tokens - val, "val": val}


def _write_store(store: Path, tokenizer: Tokenizer, splits: dict[str, list[Document]], caps: dict,
                 parts: dict) -> dict:
    """Tokenize each split into one shard, in a temporary directory renamed into place (a crash leaves no
    half-written store under its key); returns the manifest."""
    log(f"Tokenizing {sum(len(d) for d in splits.values())} documents...")
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{store.name}.", dir=store.parent))
    try:
        writer = ShardWriter(tmp, 0, token_dtype(tokenizer.vocab_size), tuple(splits))
        for split, docs in splits.items():
            stream, starts = encode_documents(tokenizer, docs, caps.get(split))
            for a, b in zip(starts, [*starts[1:], len(stream)]):
                writer.add(split, stream[a:b])
        entry = writer.seal(0, sum(len(d) for d in splits.values()))
        if caps and entry["train"]["tokens"] < caps["train"]:
            log(f"Note: max_tokens={parts['max_tokens']} asked, the corpus has "
                f"{entry['train']['tokens'] + entry['val']['tokens']:,} tokens")
        manifest = {"format": STORE_FORMAT, "source": parts["source"], "inputs": parts, "tokenizer": tokenizer.identity,
                    "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
                    "split": {k: parts[k] for k in ("val_fraction", "split_seed", "test_fraction")},
                    "part": {"index": 0, "count": 1}, "shards": [entry], "documents": entry["documents"],
                    "complete": True, "val_document_names": [d.name for d in splits["val"]][:1000]}
        write_manifest(tmp, manifest)
        if store.exists():  # an entry under our own key that failed its checks
            shutil.rmtree(store)
        os.replace(tmp, store)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _open(store: Path, manifest: dict, tokenizer: Tokenizer, verify: bool) -> TokenizedCorpus:
    split = {name: open_split(store, name, verify=verify)[0] for name in ("train", "val", "test")
             if holds_split(manifest, name)}
    entry = manifest["shards"][0]
    meta = dict(manifest["inputs"], key=store.name, n_train=len(split["train"].tokens), n_val=len(split["val"].tokens),
                n_train_documents=entry["train"]["documents"], n_val_documents=entry["val"]["documents"],
                val_document_names=manifest.get("val_document_names", []))
    test = split.get("test")
    return TokenizedCorpus(split["train"].tokens, split["val"].tokens, split["train"].doc_starts,
                           split["val"].doc_starts, eot_id=tokenizer.eot_id, token_bytes=tokenizer.token_bytes(),
                           meta=meta, test=None if test is None else test.tokens,
                           test_doc_starts=None if test is None else test.doc_starts)
