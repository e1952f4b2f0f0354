"""Data pipeline: sources -> document split -> tokenizer -> one token store (a small corpus's one shard in the
cache, corpus.py; a large one's shards, prepare.py) -> windows (dataset.py) -> batches (loaders.py,
sharded_loader.py)."""

from .loaders import create_dataloaders, held_out_loader, open_corpus
from .sharded_loader import ShardedLoader
from .dataset import (
    DocumentDataset,
    PackedDataset,
    RandomChunkDataset,
    TextTokenDataset,
    create_dataset,
)
from .corpus import TokenizedCorpus, load_and_cache_data, split_documents
from .sources import Document, iter_hf_dataset, load_documents
from .tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Document", "DocumentDataset", "PackedDataset", "RandomChunkDataset", "TextTokenDataset",
    "ShardedLoader", "TokenizedCorpus", "Tokenizer", "create_dataloaders", "create_dataset", "held_out_loader",
    "iter_hf_dataset", "load_and_cache_data", "load_documents", "load_tokenizer", "open_corpus", "split_documents", "train_bpe",
]
