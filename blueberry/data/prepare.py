"""`blueberry prepare`: a document source of any size -> a sharded token store (token_store.py).

    1. documents stream from the source (sources.py); with --shard-index i --num-shards n, a machine
       takes every n-th file of a local source (every n-th document of a stream);
    2. each document goes to train, val or test (--test-fraction) by a hash of its text and --split-seed:
       deterministic, no global shuffle, stable as the corpus grows, duplicates of a text land in the same
       split, and the validation documents do not depend on the test fraction;
    3. the tokenizer: --tokenizer, or a byte-level BPE trained on the first --bpe-sample-mb of training
       documents of the whole source (saved as STORE/tokenizer.json): every machine of a --num-shards job
       trains the same one (deterministic), so their parts merge;
    4. documents are tokenized in batches by --workers processes, at most 2 batches per worker in flight,
       and appended in source order to the current shard's files: memory stays flat whatever the size;
    5. a shard is sealed past --shard-tokens training tokens, and the manifest records how many source
       documents are done. An interrupted prepare resumes after the last sealed shard; a finished one is
       a cache hit decided from the manifest alone (file sizes and modification times; a file whose
       time changed but whose content hash did not is still a hit).

What it may remove: `--out` must be absent, empty, or a store an earlier prepare wrote (its manifest.json,
or the marker .blueberry-prepare written into the empty directory it started from); anything else is
refused (exit 2). A rebuild removes only what that store's manifest and marker prove prepare wrote there
(the shards it lists, its tokenizer.json by checksum, its own temporaries): files beside them survive.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..logs import get_logger
from .cache import file_sha256, token_dtype
from .fast_encode import fast_encoder
from .sources import is_local, iter_documents, local_files, source_identity
from .token_store import (OPTIONAL_SPLITS, SPLITS, ShardWriter, claim_store, read_manifest, write_manifest, write_marker,
                          wrote_tokenizer)
from .tokenizer import Tokenizer, load_tokenizer, train_bpe

log = get_logger(__name__).info

BATCH_DOCUMENTS = 256
SHARD_NAME = re.compile(r"shard-\d{5}")


@dataclass
class PrepareSettings:
    source: str
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer.json or a transformers directory; None: train a BPE
    vocab_size: int = 8192
    val_fraction: float = 0.1
    split_seed: int = 0
    test_fraction: float = 0.0
    num_documents: int | None = None
    max_tokens: int | None = None
    shard_tokens: int = 100_000_000
    workers: int = 0  # 0: one per core
    shard_index: int = 0
    num_shards: int = 1
    bpe_sample_mb: float = 64.0

    def inputs(self) -> dict:
        """What decides the store's content (not how fast it is made)."""
        d = asdict(self)
        d.pop("workers")
        if not self.test_fraction:  # a store made before the test split existed stays up to date
            d.pop("test_fraction")
        d["source"] = source_identity(self.source)
        return d


def split_of(text: str, settings: PrepareSettings) -> str:
    """"val", "test" or "train": where a hash of the text (keyed by the split seed) falls."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8,
                             key=str(settings.split_seed).encode()).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < settings.val_fraction:
        return "val"
    return "test" if u < settings.val_fraction + settings.test_fraction else "train"


def splits_of(settings: PrepareSettings) -> tuple[str, ...]:
    return ("train", "val", "test") if settings.test_fraction > 0 else ("train", "val")


def file_records(files: list[Path], with_hash: bool) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()
        rec = {"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if with_hash:
            rec["sha256"] = file_sha256(f)
        out.append(rec)
    return out


def same_files(recorded: list[dict], current: list[dict]) -> bool:
    """Sizes and times say so in microseconds; a file whose time moved but whose size did not is hashed."""
    if [r["path"] for r in recorded] != [c["path"] for c in current]:
        return False
    for r, c in zip(recorded, current):
        if r["size"] != c["size"]:
            return False
        if r["mtime_ns"] != c["mtime_ns"] and r.get("sha256") != file_sha256(Path(c["path"])):
            return False
    return True


def my_files(settings: PrepareSettings) -> list[Path] | None:
    """This machine's files of a local source (None for built-in corpora and streams)."""
    if not is_local(settings.source):
        return None
    return local_files(settings.source)[settings.shard_index::settings.num_shards]


def prepare(settings: PrepareSettings, store: Path) -> dict:
    """Build (or resume, or find complete) the store of `settings`; returns its manifest."""
    store = Path(store)
    _check(settings)
    claim_store(store, "--out")
    files = my_files(settings)
    current = file_records(files, with_hash=False) if files is not None else []
    manifest = read_manifest(store)
    _refuse_foreign_tokenizer(settings, store, manifest)  # before anything is cleared
    if manifest is not None and manifest.get("inputs") == settings.inputs() and same_files(manifest["files"], current):
        if manifest["complete"]:
            log(f"Token store up to date: {store} ({_counts(manifest)})")
            return manifest
        log(f"Resuming {store} after {len(manifest['shards'])} complete shard(s), {manifest['documents']:,} documents")
    else:
        if manifest is not None:
            log(f"{store} was made from other data or settings: rebuilding it")
        _clear(store, manifest)
        manifest = None
    _clear_partial(store)
    tokenizer, tokenizer_spec = _tokenizer(settings, store, manifest)
    if manifest is None:
        manifest = {"format": 1, "source": settings.source, "inputs": settings.inputs(),
                    "files": file_records(files, with_hash=True) if files is not None else [],
                    "tokenizer": tokenizer.identity, "vocab_size": tokenizer.vocab_size,
                    "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
                    "split": {"val_fraction": settings.val_fraction, "split_seed": settings.split_seed,
                              "test_fraction": settings.test_fraction},
                    "part": {"index": settings.shard_index, "count": settings.num_shards},
                    "shards": [], "documents": 0, "complete": False}
        write_manifest(store, manifest)
    return _fill(settings, store, manifest, tokenizer, tokenizer_spec, files)


def _check(settings: PrepareSettings) -> None:
    if not 0 <= settings.shard_index < settings.num_shards:
        raise DataError(f"--shard-index {settings.shard_index} must be in 0..{settings.num_shards - 1}")
    if not 0 < settings.val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {settings.val_fraction}")
    if not 0 <= settings.test_fraction < 1 - settings.val_fraction:
        raise DataError(f"--test-fraction must be in [0, 1 - val fraction), got {settings.test_fraction}")
    if settings.shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {settings.shard_tokens}")


def _clear(store: Path, manifest: dict | None) -> None:
    """Remove what an earlier prepare provably wrote in `store`, nothing else."""
    for entry in (manifest or {}).get("shards", []):
        if SHARD_NAME.fullmatch(entry["name"]) and (store / entry["name"]).is_dir():
            shutil.rmtree(store / entry["name"])  # a merged store's entries point into parts: never matched
    if wrote_tokenizer(store, manifest):
        (store / "tokenizer.json").unlink()
    if manifest is not None:
        (store / "manifest.json").unlink()
    for p in store.glob(".manifest.*"):  # write_manifest's temporaries
        p.unlink(missing_ok=True)


def _clear_partial(store: Path) -> None:
    for p in store.glob(".shard-*"):  # a shard being written when the last prepare stopped
        shutil.rmtree(p, ignore_errors=True)


def _refuse_foreign_tokenizer(settings: PrepareSettings, store: Path, manifest: dict | None) -> None:
    path = store / "tokenizer.json"
    if not settings.tokenizer and path.exists() and not wrote_tokenizer(store, manifest):
        raise DataError(f"{path} was not written by blueberry prepare; move it away, or pass it as "
                        "--tokenizer (nothing was removed)")


def _tokenizer(settings: PrepareSettings, store: Path, manifest: dict | None) -> tuple[Tokenizer, str]:
    if settings.tokenizer:
        return load_tokenizer(settings.tokenizer), settings.tokenizer
    path = store / "tokenizer.json"
    if path.exists():  # ours (a foreign one was refused before anything was cleared)
        return load_tokenizer(str(path)), str(path)
    # the sample comes from the whole source, not this machine's share: every part trains the same BPE
    sample_files = local_files(settings.source) if is_local(settings.source) else None
    budget, texts = settings.bpe_sample_mb * 1e6, []
    for doc in iter_documents(settings.source, settings.text_field, sample_files):
        if split_of(doc.text, settings) == "train":
            texts.append(doc.text)
            budget -= len(doc.text)
            if budget <= 0:
                break
    if not texts:
        raise DataError(f"{settings.source}: no training documents to train a tokenizer on")
    log(f"Training a byte-level BPE tokenizer (vocab {settings.vocab_size}) on {len(texts):,} training documents")
    tok = train_bpe(texts, settings.vocab_size)
    tmp = store / ".tokenizer.json.tmp"
    tok.save(tmp)
    write_marker(store, {"tokenizer_sha256": file_sha256(tmp)})  # recorded before it takes its name
    tmp.replace(path)
    return load_tokenizer(str(path)), str(path)


# ---- tokenizing in worker processes ----
_WORKER_TOKENIZER = None


_WORKER_ENCODE = None  # the worker's batch encoder: tiktoken where it gives the same ids (data/fast_encode.py)


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER, _WORKER_ENCODE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: --workers says how many cores
    _WORKER_TOKENIZER, _WORKER_ENCODE = load_tokenizer(spec), None


def _encode(texts: list[str]) -> list[np.ndarray]:
    global _WORKER_ENCODE
    if _WORKER_ENCODE is None:  # decided on the worker's first texts: tiktoken only if its ids are the same
        _WORKER_ENCODE = fast_encoder(_WORKER_TOKENIZER, texts[:16]) or _WORKER_TOKENIZER.encode_batch
    return [np.asarray(ids, dtype=np.int64) for ids in _WORKER_ENCODE(texts)]


def _encoded_batches(batches, workers: int, tokenizer_spec: str):
    """(texts' batch, their token arrays) in order; with workers > 1 in a process pool, at most two batches
    per worker in flight (the source is never read further ahead than that)."""
    if workers <= 1:
        _init_worker(tokenizer_spec)
        for batch in batches:
            yield batch, _encode([t for _, t in batch])
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(tokenizer_spec,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode, [t for _, t in batch])))
            if len(pending) >= 2 * workers:
                b, fut = pending.popleft()
                yield b, fut.result()
        while pending:
            b, fut = pending.popleft()
            yield b, fut.result()


def _document_batches(settings: PrepareSettings, files, skip: int):
    """Batches of (split, text) from document `skip` on (documents before it are in sealed shards)."""
    batch, position = [], -1
    docs = iter_documents(settings.source, settings.text_field, files)
    for i, doc in enumerate(docs):
        if files is None and i % settings.num_shards != settings.shard_index:
            continue  # a stream: this machine's every n-th document (files: already this machine's share)
        position += 1
        if position < skip:
            continue
        batch.append((split_of(doc.text, settings), doc.text))
        if len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


def _fill(settings, store, manifest, tokenizer, tokenizer_spec, files) -> dict:
    workers = settings.workers or os.cpu_count() or 1
    dtype = np.dtype(manifest["dtype"])
    done = manifest["documents"]
    total_tokens = sum(s[split]["tokens"] for s in manifest["shards"] for split in SPLITS + OPTIONAL_SPLITS if split in s)
    splits = splits_of(settings)
    writer, first = ShardWriter(store, len(manifest["shards"]), dtype, splits), done
    t0, eot = time.perf_counter(), np.asarray([tokenizer.eot_id], dtype=np.int64)
    stop = False
    try:
        for batch, encoded in _encoded_batches(_document_batches(settings, files, done), workers, tokenizer_spec):
            for (split, _), ids in zip(batch, encoded):
                tokens = np.concatenate([eot, ids])
                if settings.max_tokens is not None and total_tokens + len(tokens) >= settings.max_tokens:
                    tokens, stop = tokens[:settings.max_tokens - total_tokens], True
                writer.add(split, tokens)
                total_tokens += len(tokens)
                done += 1
                stop = stop or (settings.num_documents is not None and done >= settings.num_documents)
                if writer.tokens["train"] >= settings.shard_tokens or stop:
                    manifest = _seal(store, manifest, writer, first, done, t0)
                    writer, first = ShardWriter(store, len(manifest["shards"]), dtype, splits), done
                if stop:
                    break
            if stop:
                break
        if sum(writer.tokens.values()):
            manifest = _seal(store, manifest, writer, first, done, t0)
        else:
            writer.discard()
    except BaseException:
        writer.discard()
        raise
    for split in splits[1:]:
        if not manifest["shards"] or not any(s[split]["tokens"] for s in manifest["shards"]):
            raise DataError(f"{settings.source}: {done} document(s) gave no {split} documents at --{split}-fraction "
                            f"{getattr(settings, split + '_fraction')}; use more documents or a larger fraction")
    manifest["complete"] = True
    write_manifest(store, manifest)
    log(f"Token store ready: {store} ({_counts(manifest)}) in {time.perf_counter() - t0:.1f} s")
    return manifest


def _seal(store, manifest, writer, first, done, t0) -> dict:
    entry = writer.seal(first, done - first)
    manifest = {**manifest, "shards": manifest["shards"] + [entry], "documents": done}
    write_manifest(store, manifest)
    tokens = " / ".join(f"{entry[split]['tokens']:,} {split}" for split in SPLITS + OPTIONAL_SPLITS if split in entry)
    log(f"  shard {entry['name']}: {tokens} tokens ({done:,} documents, {time.perf_counter() - t0:.0f} s)")
    return manifest


def _counts(manifest: dict) -> str:
    splits = [split for split in SPLITS + OPTIONAL_SPLITS if manifest["shards"] and split in manifest["shards"][0]]
    tokens = " / ".join(f"{sum(s[split]['tokens'] for s in manifest['shards']):,} {split}" for split in splits)
    return f"{len(manifest['shards'])} shard(s), {tokens} tokens, {manifest['documents']:,} documents"
