"""The one batch loader: batches from the shards of a token store (token_store.py), whatever their size.

`ShardedLoader`: one window set per shard (dataset.py: packed, document, random_chunk or text_token windows,
or sft.py's masked conversations), read by memory map. An epoch visits the shards in a permutation drawn
from (seed, epoch) and each shard's windows in a permutation drawn from (seed, epoch, shard); a step of w ranks
takes the next w * batch windows of that sequence, rank r every w-th from offset r, so ranks read disjoint
data. No window crosses a shard. The state is (epoch, windows consumed by all ranks together): independent of
the world size, so a resume on another number of processes continues where the run stopped, no window twice
or skipped. A corpus small enough for memory is a store of one shard: the same loader, state and resume.

`MixtureLoader`: several sources with weights. Each row of a batch comes from a source drawn with a
generator seeded by (seed, rank, batch number), so the draw needs no saved RNG: its state is the batch
number and each source's own state. It counts the tokens it served per source (for the training log). Its
position is per rank (each rank draws its own sources): it resumes on the world size that wrote it only.

`Prefetched`: a background thread that prepares the next batches while the model trains on this one;
its state is that of the last batch handed out, not of the batches read ahead.
"""

from __future__ import annotations

import queue
import threading
import numpy as np
import torch

from ..errors import CheckpointError, DataError
from ..logs import get_logger
from .data_position import consumed_of
from .dataset import PackedDataset
from .token_store import Shard

log = get_logger(__name__)
ORDER_VERSION = 2  # how windows are ordered (1: before the one data path, when small corpora had their own loader)


def window_sets(shards: list[Shard], cut, seq_len: int) -> list:
    """`cut(shard)` of each shard long enough for one window (none is: the first one, which says why)."""
    fit = [s for s in shards if len(s.tokens) > seq_len]
    return [cut(s) for s in (fit or shards[:1])]


def packed_windows(shards: list[Shard], seq_len: int, document_mask: bool = False) -> list[PackedDataset]:
    """Packed windows of each shard (the store's default way of cutting windows)."""
    return window_sets(shards, lambda s: PackedDataset(s.tokens, seq_len, s.doc_starts, document_mask), seq_len)


class ShardedLoader:
    def __init__(self, parts: list, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None):
        if not parts:
            raise DataError("no shard holds one window of --seq-len + 1 tokens; use more data or a smaller --seq-len")
        self.parts, self.seq_len, self.batch_size = parts, parts[0].seq_len, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.max_batches = max_batches
        self.windows = np.array([len(p) for p in parts], dtype=np.int64)
        self.epoch, self.consumed = 0, 0  # windows of this epoch's sequence taken, by all ranks together
        self._orders: dict = {}  # the permutations of one epoch, drawn when first needed
        if self.batches_per_epoch == 0:
            raise DataError(f"{int(self.windows.sum())} windows of {self.seq_len + 1} tokens cannot fill one batch of "
                            f"{batch_size} per process on {world_size} process(es); use a smaller --batch-size "
                            "or --seq-len, or more data")

    @property
    def num_windows(self) -> int:
        return int(self.windows.sum())

    @property
    def batches_per_epoch(self) -> int:
        n = self.num_windows // self.world_size // self.batch_size
        return min(n, self.max_batches) if self.max_batches else n

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def step_windows(self) -> int:
        return self.batch_size * self.world_size

    @property
    def position(self) -> int:
        """Steps of this world size into the epoch."""
        return self.consumed // self.step_windows

    # ---- which window is the i-th of an epoch ----
    def _cached(self, key: tuple, make):
        if key[0] != self._orders.get("epoch"):  # keep one epoch's permutations only
            self._orders = {"epoch": key[0]}
        if key not in self._orders:
            self._orders[key] = make()
        return self._orders[key]

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        def make():
            order = np.arange(len(self.parts))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.parts))
            return order, np.cumsum(self.windows[order])
        return self._cached((epoch, "shards"), make)

    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        return self._cached((epoch, shard), lambda: np.random.default_rng([self.seed, epoch, shard]).permutation(
            int(self.windows[shard])))

    def _locate(self, epoch: int, i: int) -> tuple[int, int]:
        """(shard, window) of the i-th window of `epoch` (over all ranks)."""
        order, ends = self._shard_order(epoch)
        k = int(np.searchsorted(ends, i, side="right"))
        shard = int(order[k])
        local = i - (int(ends[k - 1]) if k else 0)
        return shard, int(self._window_order(epoch, shard)[local]) if self.shuffle else local

    def _window(self, epoch: int, shard: int, window: int) -> tuple[np.ndarray, ...]:
        part = self.parts[shard]
        part.set_epoch(epoch)  # random_chunk draws its offsets per epoch
        return part[window]

    def batch(self, epoch: int, b: int) -> tuple[torch.Tensor, ...]:
        return self._batch_at(epoch, b * self.step_windows)

    def _batch_at(self, epoch: int, start: int) -> tuple[torch.Tensor, ...]:
        """This rank's share of the step whose windows start at `start` of the epoch's sequence."""
        first = start + self.rank
        items = [self._window(epoch, *self._locate(epoch, first + j * self.world_size))
                 for j in range(self.batch_size)]
        return tuple(torch.from_numpy(np.stack(col)) for col in zip(*items))

    # ---- the training interface ----
    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.consumed + self.step_windows > self.num_windows or (
                self.max_batches and self.position >= self.max_batches):
            self.epoch, self.consumed = self.epoch + 1, 0
        out = self._batch_at(self.epoch, self.consumed)
        self.consumed += self.step_windows
        return out

    def __iter__(self):
        """One pass from the start (evaluation: unshuffled, every window at most once)."""
        for b in range(self.batches_per_epoch):
            yield self.batch(0, b)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "num_samples": self.num_windows, "order": ORDER_VERSION}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != ORDER_VERSION:
            log.warning("the checkpoint's data position was saved by an earlier version, which ordered the windows "
                        "otherwise: the run goes on from the same count of windows in a new order (this epoch may "
                        "repeat or skip some)")
        if state.get("num_samples") not in (None, self.num_windows):
            raise CheckpointError(f"the checkpoint's data position is for {state['num_samples']} windows, this "
                                  f"store has {self.num_windows}: resume with the same data and --seq-len")
        self.epoch, self.consumed, self.seed = state["epoch"], consumed_of(state, self), state["seed"]


class MixtureLoader:
    def __init__(self, loaders: dict[str, ShardedLoader], weights: dict[str, float], batch_size: int, seed: int = 0,
                 rank: int = 0):
        self.loaders, self.batch_size, self.seed, self.rank = loaders, batch_size, seed, rank
        total = sum(weights.values())
        self.names = list(loaders)
        self.p = np.array([weights[n] / total for n in self.names])
        self.batches = 0
        self.tokens_by_source = {n: 0 for n in self.names}

    @property
    def epoch(self) -> int:
        return max(loader.epoch for loader in self.loaders.values())

    @property
    def position(self) -> int:
        return self.batches

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, self.rank, self.batches])
        picks = rng.choice(len(self.names), size=self.batch_size, p=self.p)
        rows = []
        for k in picks:
            name = self.names[k]
            rows.append(self.loaders[name].next_batch())  # each source loader serves one window per call
            self.tokens_by_source[name] += self.loaders[name].seq_len
        self.batches += 1
        return tuple(torch.cat(col) for col in zip(*rows))

    def state_dict(self) -> dict:
        return {"batches": self.batches, "tokens_by_source": dict(self.tokens_by_source),
                "sources": {n: loader.state_dict() for n, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state.get("sources", {})) != set(self.loaders):
            raise CheckpointError(f"the checkpoint's mixture has sources {sorted(state.get('sources', {}))}, "
                                  f"this run {sorted(self.loaders)}: resume with the same --dataset")
        world = next(iter(self.loaders.values())).world_size
        written = next(iter(state["sources"].values())).get("world_size", world)
        if written != world:
            raise CheckpointError(f"a --dataset mixture's data position is per rank: resume it on the {written} "
                                  f"process(es) that wrote it, not {world}")
        self.batches = state["batches"]
        self.tokens_by_source = dict(state["tokens_by_source"])
        for n, loader in self.loaders.items():
            loader.load_state_dict(state["sources"][n])


class EvalConcat:
    """Validation over several sources: each source's first batches in turn, as many as its weight's share."""

    def __init__(self, loaders: list[ShardedLoader]):
        self.loaders = loaders

    def __iter__(self):
        for loader in self.loaders:
            yield from loader

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)


class Prefetched:
    """`loader` read `depth` batches ahead by a background thread."""

    def __init__(self, loader, depth: int = 4):
        self.loader, self.depth = loader, depth
        self._thread = None
        self._state = loader.state_dict()

    def __getattr__(self, name):  # epoch, position, batches_per_epoch, tokens_by_source ... of the loader
        return getattr(self.loader, name)

    def _produce(self, q: queue.Queue, halt: threading.Event) -> None:
        try:
            while not halt.is_set():
                batch = self.loader.next_batch()
                item = (batch, self.loader.state_dict())
                while not halt.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, raised there
            q.put((exc, None))

    def next_batch(self):
        if self._thread is None:
            self._queue, self._halt = queue.Queue(self.depth), threading.Event()
            self._thread = threading.Thread(target=self._produce, args=(self._queue, self._halt), daemon=True,
                                            name="batch-prefetch")
            self._thread.start()
        batch, state = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self._state = state
        return batch

    @property
    def tokens_by_source(self):
        return self._state.get("tokens_by_source")

    def stop(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
            self.loader.load_state_dict(self._state)  # forget the batches read ahead

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.stop()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
