"""On-disk token cache: memory-mapped integer arrays plus a JSON manifest with sizes and checksums.

Layout of one entry, `CACHE_DIR/<key>/`:
  train.bin, val.bin               tokens (uint16 when the vocabulary fits, else uint32)
  train_docs.npy, val_docs.npy     offsets where each document starts (int64)
  meta.json                        key, dtype, lengths, sha256 of every file, counts for reporting
An entry is written to a temporary directory and renamed into place, so a crash never leaves a
half-written entry under its final name. A damaged entry fails `read_entry` and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
ARRAYS = ("train.bin", "val.bin", "train_docs.npy", "val_docs.npy")


class CacheCorrupt(Exception):
    """The entry exists but does not match its manifest."""


def cache_key(parts: dict) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_entry(root: Path, key: str, train: np.ndarray, val: np.ndarray, train_docs: np.ndarray,
                val_docs: np.ndarray, info: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        np.save(tmp / "train_docs.npy", train_docs.astype(np.int64))
        np.save(tmp / "val_docs.npy", val_docs.astype(np.int64))
        meta = dict(info, key=key, dtype=np.dtype(train.dtype).name, n_train=int(train.size), n_val=int(val.size),
                    files={name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                           for name in ARRAYS})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_entry(path: Path, verify_checksums: bool = True) -> tuple[dict, dict]:
    """(meta, arrays) for a valid entry; raises FileNotFoundError or CacheCorrupt."""
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(path)
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CacheCorrupt(f"{meta_path}: unreadable manifest ({exc})") from None
    for name in ARRAYS:
        p = path / name
        if not p.exists():
            raise CacheCorrupt(f"{p} is missing")
        if p.stat().st_size != files[name]["size"]:
            raise CacheCorrupt(f"{p} has {p.stat().st_size} bytes, manifest says {files[name]['size']}")
        if verify_checksums and file_sha256(p) != files[name]["sha256"]:
            raise CacheCorrupt(f"{p} does not match its checksum")
    dtype = np.dtype(meta["dtype"])
    arrays = {
        "train": np.memmap(path / "train.bin", dtype=dtype, mode="r", shape=(meta["n_train"],)),
        "val": np.memmap(path / "val.bin", dtype=dtype, mode="r", shape=(meta["n_val"],)),
        "train_docs": np.load(path / "train_docs.npy"),
        "val_docs": np.load(path / "val_docs.npy"),
    }
    return meta, arrays
