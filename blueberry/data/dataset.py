"""Ways of cutting (input, target) windows from a token stream (one shard of a token store); `create_dataset`
picks one by name (`--dataset-type`).

  text_token    windows every `stride` tokens (the seed's TextTokenDataset; stride 1 = every offset)
  packed        non-overlapping windows (stride = seq_len): every token seen once per epoch
  random_chunk  windows at random offsets drawn from (seed, epoch, index)
  document      windows starting at document starts (long documents continue in further windows)
Given the document starts and `return_doc_ids` (--document-mask), each item also carries a document id per
position, so that attention can be stopped at document boundaries. Each item is (x, y) or (x, y, doc_ids),
numpy int64 arrays of length seq_len.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from ..configs.fields import DATASET_TYPES
from ..errors import DataError
from ..ops.cross_entropy import IGNORE_INDEX


def _check_length(tokens, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(f"corpus too small for one training sequence: need at least {seq_len + 1} tokens "
                        f"(seq_len + 1), have {len(tokens)}. Use more data or a smaller --seq-len")


class TextTokenDataset(Dataset):
    def __init__(self, tokens, seq_len: int = 512, stride: int = 1, doc_starts=None, return_doc_ids: bool = False):
        _check_length(tokens, seq_len)
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        if return_doc_ids and doc_starts is None:
            raise ValueError("document ids need doc_starts (the offsets where documents begin)")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self.doc_starts = None if doc_starts is None else np.asarray(doc_starts, dtype=np.int64)
        self.return_doc_ids = return_doc_ids
        self.starts = np.arange(0, len(tokens) - seq_len, stride, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def window(self, start: int):
        chunk = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        if not self.return_doc_ids:
            return chunk[:-1], chunk[1:]
        doc_ids = np.searchsorted(self.doc_starts, np.arange(start, start + self.seq_len), side="right") - 1
        return chunk[:-1], chunk[1:], doc_ids.astype(np.int64)

    def __getitem__(self, i: int):
        return self.window(int(self.starts[i]))

    def set_epoch(self, epoch: int) -> None:
        """Datasets whose windows change per epoch override this."""


class PackedDataset(TextTokenDataset):
    def __init__(self, tokens, seq_len: int = 512, doc_starts=None, return_doc_ids: bool = False):
        super().__init__(tokens, seq_len, stride=seq_len, doc_starts=doc_starts, return_doc_ids=return_doc_ids)


class RandomChunkDataset(TextTokenDataset):
    def __init__(self, tokens, seq_len: int = 512, num_samples: int | None = None, seed: int = 0, doc_starts=None,
                 return_doc_ids: bool = False):
        super().__init__(tokens, seq_len, stride=seq_len, doc_starts=doc_starts, return_doc_ids=return_doc_ids)
        self.num_samples = num_samples or max(1, len(tokens) // seq_len)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return self.window(int(rng.integers(0, len(self.tokens) - self.seq_len)))


class DocumentDataset(TextTokenDataset):
    """Windows that start at document starts. For evaluation, `score_once` marks (with -100) the targets
    a later window scores: each token is then scored exactly once, in the window that starts in its own
    document (a short document would otherwise also be scored inside the window of the one before it),
    and a last window ending at the corpus end scores the tail no window covered."""

    def __init__(self, tokens, seq_len: int, doc_starts, return_doc_ids: bool = False, score_once: bool = False):
        _check_length(tokens, seq_len)
        self.tokens, self.seq_len = tokens, seq_len
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.return_doc_ids, self.score_once = return_doc_ids, score_once
        ends = np.append(self.doc_starts[1:], len(tokens))
        last_start = len(tokens) - seq_len - 1
        starts = [np.arange(s, e, seq_len) for s, e in zip(self.doc_starts, ends)]
        starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        if score_once:
            self.starts = np.unique(np.minimum(np.append(starts, 0), last_start))
            # window i scores targets j < owned[i]: those before the next window's start
            self.owned = np.append(np.diff(self.starts), seq_len)
            return
        self.starts = starts[starts <= last_start]
        if len(self.starts) == 0:
            self.starts = np.array([last_start], dtype=np.int64)

    def __getitem__(self, i: int):
        x, y, *doc_ids = self.window(int(self.starts[i]))
        if self.score_once:
            y = y.copy()
            y[int(self.owned[i]):] = IGNORE_INDEX
        return (x, y, *doc_ids)


def create_dataset(tokens, dataset_type: str = "packed", seq_len: int = 512, *, stride: int | None = None,
                   doc_starts=None, document_mask: bool = False, seed: int = 0, num_samples: int | None = None,
                   score_once: bool = False):
    ids = dict(doc_starts=doc_starts, return_doc_ids=document_mask)
    if dataset_type == "text_token":
        return TextTokenDataset(tokens, seq_len, stride or max(1, seq_len // 2), **ids)
    if dataset_type == "packed":
        return PackedDataset(tokens, seq_len, **ids)
    if dataset_type == "random_chunk":
        return RandomChunkDataset(tokens, seq_len, num_samples=num_samples, seed=seed, **ids)
    if dataset_type == "document":
        if doc_starts is None:
            raise ValueError("the document dataset needs doc_starts (the offsets where documents begin)")
        return DocumentDataset(tokens, seq_len, doc_starts, return_doc_ids=document_mask, score_once=score_once)
    raise ValueError(f"unknown dataset_type {dataset_type!r}; choose one of {', '.join(DATASET_TYPES)}")
