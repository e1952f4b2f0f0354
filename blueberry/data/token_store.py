"""A sharded token store on disk: what `blueberry prepare` writes and the large-data loader reads.

    STORE/manifest.json
    STORE/tokenizer.json                     the tokenizer the tokens were made with (when trained here)
    STORE/shard-00000/train.bin  val.bin     tokens (uint16 when the vocabulary fits, else uint32)
                      train_docs.npy val_docs.npy   offsets where each document starts (int64)
                      test.bin test_docs.npy        the test split, when the store was made with one

A shard holds the documents of a contiguous stretch of the source, every split; it is closed at the first
document boundary past `shard_tokens` training tokens. Its files are written into a temporary directory,
fsynced, checksummed (sha256, computed while writing) and renamed into place; then the manifest, rewritten
atomically, lists it together with how many source documents have been consumed so far. So a killed
`prepare` leaves complete shards and a manifest that says where to resume, never a half shard under its
final name. A merged store (several machines' parts) lists shard directories inside the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import DataError
from .cache import file_sha256

STORE_FORMAT = 1
SPLITS = ("train", "val")  # what every store has
OPTIONAL_SPLITS = ("test",)
MARKER = ".blueberry-prepare"  # written into the empty directory a prepare starts from: the store is ours


def read_manifest(store: Path) -> dict | None:
    path = Path(store) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return manifest if manifest.get("format") == STORE_FORMAT else None


def write_manifest(store: Path, manifest: dict) -> None:
    """Atomically: a reader sees the old manifest or the new one, never a partial file."""
    atomic_write_text(Path(store) / "manifest.json", json.dumps(manifest, indent=1))  # temporary .manifest.json.*


def is_store(path) -> bool:
    return read_manifest(Path(path)) is not None


def claim_store(store: Path, flag: str) -> None:
    """Make `store` ours (absent or empty: created, marked) or prove it is (a manifest or our marker);
    anything else is refused with exit 2, nothing written or removed."""
    if store.exists() and not store.is_dir():
        raise DataError(f"{flag} {store} is a file, not a directory; choose a new directory")
    if store.exists() and any(store.iterdir()):
        if read_manifest(store) is None and not (store / MARKER).is_file():
            raise DataError(f"{flag} {store} is not empty and is not a token store written by blueberry prepare; "
                            "choose a new or empty directory (nothing was removed)")
        return
    store.mkdir(parents=True, exist_ok=True)
    write_marker(store, {})


def _read_marker(store: Path) -> dict:
    try:
        return json.loads((store / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(store: Path, record: dict) -> None:
    atomic_write_text(store / MARKER, json.dumps({"written_by": "blueberry prepare", **record}) + "\n")


def wrote_tokenizer(store: Path, manifest: dict | None) -> bool:
    """Whether STORE/tokenizer.json is the one prepare wrote there: its checksum is the manifest's tokenizer
    identity, or the one the marker recorded when it was trained."""
    path = store / "tokenizer.json"
    if not path.is_file():
        return False
    digest = file_sha256(path)
    return ((manifest or {}).get("tokenizer") == f"file:{digest[:16]}"
            or _read_marker(store).get("tokenizer_sha256") == digest)


class ShardWriter:
    """Appends the documents of one shard to its files as they come (memory stays flat), then seals it."""

    def __init__(self, store: Path, index: int, dtype, splits: tuple[str, ...] = SPLITS):
        self.store, self.index, self.dtype = Path(store), index, np.dtype(dtype)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".shard-{index:05d}.", dir=self.store))
        self.files = {s: open(self.tmp / f"{s}.bin", "wb") for s in splits}
        self.hashes = {s: hashlib.sha256() for s in splits}
        self.starts = {s: [] for s in splits}
        self.tokens = {s: 0 for s in splits}

    def add(self, split: str, ids: np.ndarray) -> None:
        """One document's tokens (its end-of-text first) to `split`."""
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.starts[split].append(self.tokens[split])
        self.files[split].write(data)
        self.hashes[split].update(data)
        self.tokens[split] += len(ids)

    def seal(self, first_document: int, documents: int) -> dict:
        """Close, fsync and rename into place; the shard's manifest entry."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split, starts in self.starts.items():
            np.save(self.tmp / f"{split}_docs.npy", np.asarray(starts, dtype=np.int64))
        name = f"shard-{self.index:05d}"
        final = self.store / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.tmp, final)
        return {"name": name, "first_document": first_document, "documents": documents,
                **{split: {"tokens": self.tokens[split], "documents": len(self.starts[split]),
                           "sha256": self.hashes[split].hexdigest()} for split in self.starts}}

    def discard(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Shard:
    """One shard's tokens of one split, its document starts and, for fine-tuning conversations (held in
    memory, sft.py), the loss mask."""
    tokens: np.ndarray  # memory-mapped, or in memory
    doc_starts: np.ndarray
    mask: np.ndarray | None = None


def holds_split(manifest: dict, split: str) -> bool:
    return all(split in entry for entry in manifest["shards"])


def has_split(store: Path, split: str) -> bool:
    manifest = read_manifest(Path(store))
    return manifest is not None and holds_split(manifest, split)


def open_split(store: Path, split: str, verify: bool = False) -> list[Shard]:
    """The non-empty shards of one split, memory-mapped. `verify` re-checks every checksum (slow on big stores)."""
    store = Path(store)
    manifest = read_manifest(store)
    if manifest is None:
        raise DataError(f"{store} is not a token store (no readable manifest.json); build it with blueberry prepare")
    if not holds_split(manifest, split):
        raise DataError(f"{store} has no {split} split: prepare it again with --{split}-fraction")
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for entry in manifest["shards"]:
        path = (store / entry["name"]).resolve()
        info = entry[split]
        if info["tokens"] == 0:
            continue
        data = path / f"{split}.bin"
        if not data.exists() or data.stat().st_size != info["tokens"] * dtype.itemsize:
            raise DataError(f"{data} is missing or has the wrong size for its manifest; run blueberry prepare again")
        if verify and file_sha256(data) != info["sha256"]:
            raise DataError(f"{data} does not match its checksum; run blueberry prepare again")
        try:
            starts = np.load(path / f"{split}_docs.npy")
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path / (split + '_docs.npy')}: unreadable ({exc}); prepare the store again") from exc
        shards.append(Shard(np.memmap(data, dtype=dtype, mode="r", shape=(info["tokens"],)), starts))
    return shards


def _merge_target(out: Path, first_part: Path) -> None:
    """`out` is absent, empty or a store (prepare.claim_store); a tokenizer.json in it that prepare did not
    write, and that is not the parts' own, is refused rather than replaced."""
    claim_store(out, "--merge")
    tok = out / "tokenizer.json"
    theirs = first_part / "tokenizer.json"
    if tok.is_file() and not wrote_tokenizer(out, read_manifest(out)) and not (
            theirs.is_file() and file_sha256(tok) == file_sha256(theirs)):
        raise DataError(f"{tok} was not written by blueberry prepare; move it away (nothing was removed)")


def merge_stores(out: Path, parts: list[Path]) -> dict:
    """One store listing the shards of `parts` (each machine's `prepare --shard-index i --num-shards n`),
    in part order; nothing is copied. The parts must be complete, of one source, tokenizer and split."""
    from ..errors import DataError

    out = Path(out)
    manifests = []
    for part in parts:
        m = read_manifest(Path(part))
        if m is None or not m.get("complete"):
            raise DataError(f"{part} is not a complete token store; finish its blueberry prepare first")
        manifests.append((Path(part), m))
    first = manifests[0][1]
    same = ("tokenizer", "dtype", "split")

    def settled(m, key):  # a manifest from before --test-fraction has no test fraction: 0
        return {"test_fraction": 0.0, **m[key]} if key == "split" else m[key]

    for part, m in manifests:
        for key in same:
            if settled(m, key) != settled(first, key):
                raise DataError(f"{part}: its {key} differs from {parts[0]}'s; parts of one store must agree")
    indices = sorted(m["part"]["index"] for _, m in manifests)
    n = first["part"]["count"]
    if indices != list(range(n)) or any(m["part"]["count"] != n for _, m in manifests):
        raise DataError(f"the parts cover shard indices {indices} of {n}: give each of 0..{n - 1} exactly once")
    _merge_target(out, Path(parts[0]))
    shards = []
    for part, m in sorted(manifests, key=lambda pm: pm[1]["part"]["index"]):
        for entry in m["shards"]:
            shards.append({**entry, "name": os.path.relpath(part.resolve() / entry["name"], out.resolve())})
    if (Path(parts[0]) / "tokenizer.json").exists():
        from ..atomic import atomic_write_bytes

        atomic_write_bytes(out / "tokenizer.json", (Path(parts[0]) / "tokenizer.json").read_bytes())
    merged = {**{k: first[k] for k in ("format", "source", "tokenizer", "dtype", "split", "vocab_size")},
              "part": {"index": 0, "count": 1}, "merged_from": [str(Path(p).resolve()) for p in parts],
              "shards": shards, "complete": True, "files": [f for _, m in manifests for f in m.get("files", [])],
              "documents": sum(m["documents"] for _, m in manifests)}
    write_manifest(out, merged)
    return merged
