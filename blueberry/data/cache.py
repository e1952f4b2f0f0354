"""The data cache's keys and the helpers its writers share: a key hashing every input of what is cached
(`CACHE_DIR/<key>/` holds a small corpus as a token store of one shard, corpus.py), the token dtype a
vocabulary needs, a file's sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3  # 3: an entry is a token store


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
