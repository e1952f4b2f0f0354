"""Batch loaders with a resumable position: what a checkpoint needs to replay the same batches.

`BatchLoader` shuffles indices with a permutation drawn from (seed, epoch): one global order, the same on
every rank. A step of w ranks with batches of b takes the next w * b indices of that order, rank r those at
offsets r, r + w, ...; so ranks read disjoint samples and the samples consumed so far are always a prefix of
the epoch's order. The state is that prefix's length (`consumed`, with the epoch and seed): independent of
the world size, so a run stopped on N processes continues on M where it stopped, no sample twice or skipped
(`load_state_dict`). An epoch ends when fewer than one step's samples are left.
"""

from __future__ import annotations

import numpy as np
import torch

from .data_position import consumed_of


def collate(items) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.stack(column)) for column in zip(*items))


class BatchLoader:
    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None):
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.max_batches = max_batches  # evaluation: a fixed number of batches per pass
        self.epoch, self.consumed = 0, 0  # samples of this epoch's order taken, by all ranks together
        self._order = None
        if self.batches_per_epoch == 0:
            from ..errors import DataError

            raise DataError(f"{len(dataset)} samples cannot fill one batch of {batch_size} per process "
                            f"on {world_size} process(es); use a smaller --batch-size or more data")

    @property
    def batches_per_epoch(self) -> int:
        per_rank = len(self.dataset) // self.world_size
        n = per_rank // self.batch_size
        return min(n, self.max_batches) if self.max_batches else n

    @property
    def step_samples(self) -> int:
        return self.batch_size * self.world_size

    @property
    def position(self) -> int:
        """Steps of this world size into the epoch."""
        return self.consumed // self.step_samples

    def _epoch_order(self) -> np.ndarray:
        """This epoch's global order (every rank's)."""
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
                self._order = torch.randperm(n, generator=g).numpy()
            else:
                self._order = np.arange(n)
            self.dataset.set_epoch(self.epoch)
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next training batch; epochs roll over forever."""
        if self.consumed + self.step_samples > len(self.dataset) or (
                self.max_batches and self.position >= self.max_batches):
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        idx = order[self.consumed + self.rank:self.consumed + self.step_samples:self.world_size]
        self.consumed += self.step_samples
        return collate([self.dataset[int(i)] for i in idx])

    def __iter__(self):
        """One pass of `batches_per_epoch` batches from the start (evaluation)."""
        order = (self._epoch_order() if self.shuffle else np.arange(len(self.dataset)))[self.rank::self.world_size]
        for b in range(self.batches_per_epoch):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield collate([self.dataset[int(i)] for i in idx])

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") not in (None, len(self.dataset)):
            from ..errors import CheckpointError

            raise CheckpointError(f"the checkpoint's data position is for {state['num_samples']} samples, this "
                                  f"dataset has {len(self.dataset)}: resume with the same data settings")
        self.epoch, self.consumed, self.seed = state["epoch"], consumed_of(state, self), state["seed"]
        self._order = None


def create_dataloaders(config, corpus, rank: int = 0, world_size: int = 1) -> tuple[BatchLoader, BatchLoader]:
    """Training loader (dataset_type from the config) and validation loader (every val token once)."""
    from .stores import StoreCorpus, create_store_loaders

    if isinstance(corpus, StoreCorpus):
        return create_store_loaders(config, corpus, rank=rank, world_size=world_size)
    train_ds, val_ds = _datasets(config, corpus)
    train = BatchLoader(train_ds, config.training.batch_size, shuffle=True, seed=config.training.seed, rank=rank,
                        world_size=world_size)
    val_batch = max(1, min(config.training.batch_size, len(val_ds) // world_size))
    val = BatchLoader(val_ds, val_batch, shuffle=False, rank=rank, world_size=world_size,
                      max_batches=config.training.eval_batches)
    return train, val


def _datasets(config, corpus):
    from .dataset import create_dataset

    if getattr(corpus, "train_mask", None) is not None:  # supervised fine-tuning: masked, packed conversations
        from .sft import SFTDataset

        return (SFTDataset(corpus.train, corpus.train_mask, corpus.train_doc_starts, config.model.max_seq_len),
                SFTDataset(corpus.val, corpus.val_mask, corpus.val_doc_starts, config.model.max_seq_len))
    train_ds = create_dataset(corpus.train, config.data.dataset_type, config.model.max_seq_len,
                              stride=config.data.stride,
                              doc_starts=corpus.train_doc_starts, document_mask=config.data.document_mask,
                              seed=config.training.seed)
    if config.data.dataset_type == "document":
        val_ds = create_dataset(corpus.val, "document", config.model.max_seq_len, doc_starts=corpus.val_doc_starts,
                                document_mask=config.data.document_mask, score_once=True)
    else:
        val_ds = create_dataset(corpus.val, "packed", config.model.max_seq_len)
    return train_ds, val_ds
