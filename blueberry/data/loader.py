"""The product spec's name for the data-loading module: `load_and_cache_data` and friends, which live in
corpus.py (building the tokenized corpus, a one-shard token store); the batch loaders are in loaders.py."""

from .corpus import TokenizedCorpus, encode_documents, load_and_cache_data, split_documents

__all__ = ["TokenizedCorpus", "encode_documents", "load_and_cache_data", "split_documents"]
