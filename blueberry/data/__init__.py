"""Data pipeline: sources -> document split -> tokenizer -> cached token streams (corpus.py) -> datasets
-> batches (batch_loader.py)."""

from .batch_loader import BatchLoader, create_dataloaders
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
    "BatchLoader", "Document", "DocumentDataset", "PackedDataset", "RandomChunkDataset", "TextTokenDataset",
    "TokenizedCorpus", "Tokenizer", "create_dataloaders", "create_dataset", "iter_hf_dataset",
    "load_and_cache_data", "load_documents", "load_tokenizer", "split_documents", "train_bpe",
]
