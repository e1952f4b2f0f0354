"""Training on token stores: which datasets take the large-data path, mixtures, and their loaders.

The large-data path (prepare.py -> token_store.py -> sharded_loader.py) is taken for
  - a prepared store (`--dataset STORE`, a directory with a manifest.json),
  - a Hugging Face stream (`hf:NAME`) or a local source over LARGE_LOCAL_BYTES,
  - a mixture: `--dataset "web.parquet:0.7,code/:0.3"` (SOURCE:WEIGHT, comma-separated) or a .yaml
    file holding a list of {source: ..., weight: ...},
  - or whenever --token-store says so (--no-token-store keeps a source in memory).
Small corpora (Shakespeare) keep the in-memory path of corpus.py, which starts in seconds.

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
from .sharded_loader import EvalConcat, MixtureLoader, Prefetched, ShardedLoader
from .sources import is_local, local_files
from .token_store import is_store, open_split, read_manifest
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
                           split_seed=config.data.split_seed,
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
    def train_shards(self):
        return {source: open_split(store, "train") for source, store, _ in self.sources}

    @property
    def first_val(self):
        return open_split(self.sources[0][1], "val")[0]

    @property
    def val(self) -> np.ndarray:  # the first validation shard (sample prompts)
        return self.first_val.tokens

    @property
    def val_doc_starts(self) -> np.ndarray:
        return self.first_val.doc_starts

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


def create_store_loaders(config, corpus: StoreCorpus, rank: int = 0, world_size: int = 1):
    """Training loader (one store, or a mixture) read ahead by a thread; validation loader."""
    common = dict(rank=rank, world_size=world_size, document_mask=config.data.document_mask)
    train_shards = corpus.train_shards
    weights = {source: w for source, _, w in corpus.sources}
    if len(train_shards) == 1:
        (shards,) = train_shards.values()
        train = ShardedLoader(shards, config.model.max_seq_len, config.training.batch_size, seed=config.training.seed,
                              **common)
    else:
        parts = {s: ShardedLoader(shards, config.model.max_seq_len, 1, seed=config.training.seed + i, **common)
                 for i, (s, shards) in enumerate(train_shards.items())}
        train = MixtureLoader(parts, weights, config.training.batch_size, seed=config.training.seed, rank=rank)
    if config.data.prefetch > 0:
        train = Prefetched(train, config.data.prefetch)
    total = sum(weights.values())
    vals = [validation_loader(store, config, max(1, round(config.training.eval_batches * w / total))
                              if len(corpus.sources) > 1 else config.training.eval_batches, rank, world_size)
            for _, store, w in corpus.sources]
    return train, vals[0] if len(vals) == 1 else EvalConcat(vals)


def validation_loader(store: Path, config, max_batches: int | None, rank: int = 0, world_size: int = 1) -> ShardedLoader:
    """A store's validation windows in order (the first `max_batches` batches; all when None)."""
    shards = open_split(store, "val")
    windows = sum((len(s.tokens) - 1) // config.model.max_seq_len for s in shards)
    batch = max(1, min(config.training.batch_size, windows // world_size))
    return ShardedLoader(shards, config.model.max_seq_len, batch, shuffle=False, max_batches=max_batches, rank=rank,
                         world_size=world_size, document_mask=config.data.document_mask)
