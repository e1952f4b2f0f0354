"""The stores of a run: which datasets `blueberry prepare` makes a store of, mixtures, opening them.

A store prepared here (prepare.py -> token_store.py) is made for
  - a prepared store (`--dataset STORE`, a directory with a manifest.json),
  - a Hugging Face stream (`hf:NAME`) or a local source over LARGE_LOCAL_BYTES,
  - a mixture: `--dataset "web.parquet:0.7,code/:0.3"` (SOURCE:WEIGHT, comma-separated) or a .yaml
    file holding a list of {source: ..., weight: ...},
  - or whenever --token-store says so (--no-token-store keeps a source in memory).
Smaller corpora (Shakespeare) become a store of one shard in the data cache (corpus.py), which starts in
seconds; both are read by the same loaders (loaders.py).

Stores made implicitly live in CACHE_DIR/stores/<key of the prepare settings>. A mixture's sources share
one tokenizer: --tokenizer, or the BPE trained for its first source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..logs import get_logger
from .prepare import PrepareSettings, prepare
from .sources import is_local, local_files
from .token_store import Shard, is_store, open_split, read_manifest
from .tokenizer import Tokenizer, load_tokenizer

log = get_logger(__name__).info

LARGE_LOCAL_BYTES = 256 * 2**20


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """[(source, weight)] of a --dataset value: one source (weight 1) or several SOURCE:WEIGHT."""
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        import yaml

        items = yaml.safe_load(Path(spec).read_text())
        if not isinstance(items, list) or not all(isinstance(i, dict) and "source" in i for i in items):
            raise DataError(f"{spec}: expected a list of {{source: ..., weight: ...}} entries")
        out = [(str(i["source"]), float(i.get("weight", 1.0))) for i in items]
    else:
        out = []
        for part in spec.split(","):
            source, _, weight = part.strip().rpartition(":")
            try:
                out.append((source, float(weight)) if source else (part.strip(), 1.0))
            except ValueError:  # "hf:name:config" or a path with a colon: no weight
                out.append((part.strip(), 1.0))
    for source, weight in out:
        if not source or not weight > 0:
            raise DataError(f"--dataset {spec!r}: every source needs a positive weight (SOURCE:WEIGHT), "
                            f"got {source!r}:{weight}")
    if len({s for s, _ in out}) != len(out):
        raise DataError(f"--dataset {spec!r} names a source twice")
    return out


def uses_token_store(config) -> bool:
    if config.data.token_store is not None:
        return config.data.token_store
    sources = parse_mixture(config.data.dataset)
    if len(sources) > 1:
        return True
    source = sources[0][0]
    if is_store(source) or source.startswith("hf:"):
        return True
    if is_local(source) and (Path(source).exists() or any(c in source for c in "*?[")):
        return sum(f.stat().st_size for f in local_files(source)) > LARGE_LOCAL_BYTES
    return False


def settings_for(config, source: str, tokenizer: str | None) -> PrepareSettings:
    return PrepareSettings(source=source, text_field=config.data.text_field, tokenizer=tokenizer,
                           vocab_size=config.model.vocab_size, val_fraction=config.data.val_fraction,
                           test_fraction=config.data.test_fraction, split_seed=config.data.split_seed,
                           num_documents=config.data.num_documents, max_tokens=config.data.max_tokens,
                           shard_tokens=config.data.shard_tokens, workers=config.data.prepare_workers)


def store_path(config, settings: PrepareSettings) -> Path:
    if is_store(settings.source):
        return Path(settings.source)
    key = hashlib.sha256(json.dumps(settings.inputs(), sort_keys=True).encode()).hexdigest()[:24]
    return Path(config.data.cache_dir) / "stores" / key


def prepare_stores(config) -> list[tuple[str, Path, float]]:
    """Make (or find) the store of every source: [(source, store, weight)]. Run on one process only."""
    out, tokenizer = [], config.data.tokenizer
    for source, weight in parse_mixture(config.data.dataset):
        settings = settings_for(config, source, tokenizer)
        store = store_path(config, settings)
        if not is_store(source):
            prepare(settings, store)
        elif not read_manifest(store).get("complete"):
            raise DataError(f"{source} is an unfinished token store: run its blueberry prepare again to finish it")
        if tokenizer is None:  # the mixture's other sources use the first one's tokenizer
            tokenizer = _tokenizer_spec(store)
        out.append((source, store, weight))
    return out


def _tokenizer_spec(store: Path) -> str:
    if (store / "tokenizer.json").exists():
        return str(store / "tokenizer.json")
    spec = read_manifest(store)["inputs"].get("tokenizer")
    if not spec:
        raise DataError(f"{store}: the store names no tokenizer")
    return spec


@dataclass
class StoreCorpus:
    """The token stores of a run: what the loaders, bits per byte and the sample prompts need."""
    sources: list[tuple[str, Path, float]]
    eot_id: int
    token_bytes: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        return {source: w for source, _, w in self.sources}

    def shards(self, split: str) -> dict[str, list[Shard]]:
        """{source: its store's shards of `split`}."""
        return {source: open_split(store, split) for source, store, _ in self.sources}

    @property
    def n_train(self) -> int:
        return sum(int(sum(s["train"]["tokens"] for s in read_manifest(st)["shards"])) for _, st, _ in self.sources)

    @property
    def n_val(self) -> int:
        return sum(int(sum(s["val"]["tokens"] for s in read_manifest(st)["shards"])) for _, st, _ in self.sources)


def open_stores(sources: list[tuple[str, Path, float]]) -> tuple[Tokenizer, StoreCorpus]:
    tokenizer = load_tokenizer(_tokenizer_spec(sources[0][1]))
    identities = {read_manifest(store)["tokenizer"] for _, store, _ in sources}
    if len(identities) > 1:
        raise DataError("the mixture's stores were tokenized with different tokenizers; prepare them with one "
                        "--tokenizer")
    corpus = StoreCorpus(sources, tokenizer.eot_id, tokenizer.token_bytes(),
                         meta={"sources": [str(s) for s, _, _ in sources]})
    log(f"Data: token store(s) {', '.join(str(st) for _, st, _ in sources)}: {corpus.n_train:,} train / "
        f"{corpus.n_val:,} val tokens, vocab {tokenizer.vocab_size}")
    return tokenizer, corpus
