"""`load_and_cache_data`: documents -> document split -> tokenizer -> cached token streams.

Order of work, each step deterministic:
  1. load the documents (built-in, local files or Hugging Face), first `num_documents` of them;
  2. split whole documents into train and val with `split_seed` (a corpus of fewer than 4 documents
     is first cut into line-aligned pieces so that a split by pieces is possible);
  3. tokenizer: the one given, or a byte-level BPE trained on the training documents only (cached);
  4. encode in batches; each document is preceded by the end-of-text token; `max_tokens` caps the
     total exactly (val gets ceil(max_tokens * val_fraction) of it);
  5. store as memory-mapped arrays under a key hashing every input of steps 1-4.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..logs import get_logger
from .cache import CacheCorrupt, cache_key, read_entry, token_dtype, write_entry
from .sources import Document, load_documents, source_identity
from .tokenizer import Tokenizer, fingerprint_texts, load_tokenizer, train_bpe

log = get_logger(__name__).info

MIN_DOCUMENTS_FOR_SPLIT = 4
PIECES_PER_SMALL_CORPUS = 20
ENCODE_BATCH = 64


@dataclass
class TokenizedCorpus:
    train: np.ndarray
    val: np.ndarray
    train_doc_starts: np.ndarray
    val_doc_starts: np.ndarray
    eot_id: int
    token_bytes: np.ndarray  # UTF-8 bytes per token id, for bits per byte
    meta: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val)

    @property
    def val_bytes(self) -> int:
        return int(self.token_bytes[np.asarray(self.val, dtype=np.int64)].sum())


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
    """(texts, tokenizer, tokens): the documents' texts, the tokenizer, and the cached token streams."""
    docs = run_documents(config)
    data = config.data
    train_docs, val_docs = split_documents(docs, data.val_fraction, data.split_seed, data.test_fraction)
    tokenizer = _get_tokenizer(config, train_docs)

    parts = {
        "source": source_identity(config.data.dataset),
        "content": fingerprint_texts(d.name + "\x01" + d.text for d in docs),
        "tokenizer": tokenizer.identity,
        "num_documents": config.data.num_documents,
        "max_tokens": config.data.max_tokens,
        "val_fraction": config.data.val_fraction,
        "split_seed": config.data.split_seed,
        "test_fraction": config.data.test_fraction,
        "text_field": config.data.text_field,
    }
    key = cache_key(parts)
    entry = Path(config.data.cache_dir) / key
    try:
        meta, arrays = read_entry(entry)
        log(f"Data cache hit: {entry}")
    except FileNotFoundError:
        meta, arrays = _build_entry(config, tokenizer, train_docs, val_docs, parts, key)
    except CacheCorrupt as exc:
        warnings.warn(f"data cache entry damaged ({exc}); rebuilding it", stacklevel=2)
        meta, arrays = _build_entry(config, tokenizer, train_docs, val_docs, parts, key)

    corpus = TokenizedCorpus(arrays["train"], arrays["val"], arrays["train_docs"], arrays["val_docs"],
                             eot_id=tokenizer.eot_id, token_bytes=tokenizer.token_bytes(), meta=meta)
    log(f"Data: {meta['n_train_documents']} train / {meta['n_val_documents']} val documents, "
        f"{meta['n_train']:,} train / {meta['n_val']:,} val tokens, vocab {tokenizer.vocab_size}")
    return [d.text for d in docs], tokenizer, corpus


def _build_entry(config, tokenizer, train_docs, val_docs, parts, key):
    log(f"Tokenizing {len(train_docs) + len(val_docs)} documents...")
    val_cap = train_cap = None
    if config.data.max_tokens is not None:
        val_cap = max(1, math.ceil(config.data.max_tokens * config.data.val_fraction))
        train_cap = config.data.max_tokens - val_cap
    train, train_starts = encode_documents(tokenizer, train_docs, train_cap)
    val, val_starts = encode_documents(tokenizer, val_docs, val_cap)
    if train_cap is not None and train.size < train_cap:
        log(f"Note: max_tokens={config.data.max_tokens} asked, the corpus has {train.size + val.size:,} tokens")
    dtype = token_dtype(tokenizer.vocab_size)
    info = dict(parts, n_train_documents=len(train_starts), n_val_documents=len(val_starts),
                val_document_names=[d.name for d in val_docs][:1000])
    write_entry(Path(config.data.cache_dir), key, train.astype(dtype), val.astype(dtype), train_starts, val_starts,
                info)
    return read_entry(Path(config.data.cache_dir) / key, verify_checksums=False)
