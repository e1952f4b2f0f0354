"""`DataConfig`: where the text comes from, how it is tokenized, split and cut into training windows."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import DATASET_TYPES, check_choices, check_positive, check_range, setting


@dataclass
class DataConfig:
    task: str = setting("pretrain", "pretrain: next-token prediction on documents; sft: supervised fine-tuning on "
                                    "a .jsonl of conversations (loss on the assistant's tokens only)",
                        choices=("pretrain", "sft"))
    dataset: str = setting("shakespeare", "shakespeare, python-docs, hf:NAME[:CONFIG], a .txt/.jsonl/.parquet file, "
                                          "directory or glob, a token store made by blueberry prepare, or a "
                                          "mixture 'SOURCE:WEIGHT,SOURCE:WEIGHT' (or a .yaml list of "
                                          "{source, weight})")
    dataset_type: str = setting("packed", "how training windows are cut", choices=DATASET_TYPES)
    tokenizer: str | None = setting(None, "a tokenizer.json or a local AutoTokenizer directory (default: train a "
                                          "byte-level BPE on the training split)")
    text_field: str = setting("text", "JSONL field / parquet column holding the text")
    num_documents: int | None = setting(None, "use at most this many documents")
    max_tokens: int | None = setting(None, "use at most this many tokens")
    val_fraction: float = setting(0.1, "fraction of documents held out for validation")
    test_fraction: float = setting(0.0, "fraction of documents held out as a test split: never trained on, never "
                                        "used for validation or choices, scored once when the run ends")
    split_seed: int = setting(0, "which documents are held out (separate from --seed so runs share a val set)")
    stride: int | None = setting(None, "text_token windows: tokens between starts (default seq_len // 2)")
    document_mask: bool = setting(False, "no attention across document boundaries")
    cache_dir: str = setting("data_cache", "where tokenized corpora are cached")
    token_store: bool | None = setting(None, "read the data through a sharded token store (default: for streams, "
                                             "mixtures, prepared stores and local data over 256 MB)")
    shard_tokens: int = setting(100_000_000, "token store: training tokens per shard")
    prepare_workers: int = setting(0, "token store: tokenizer processes when preparing (0: one per core)")
    prefetch: int = setting(4, "batches a background thread reads ahead (0: none)")

    def validate(self) -> "DataConfig":
        check_positive(self, "stride", "num_documents", "max_tokens", optional=True)
        check_positive(self, "shard_tokens")
        check_range(self, "prepare_workers", 0, 1024)
        check_range(self, "prefetch", 0, 1024)
        check_choices(self)
        check_range(self, "val_fraction", 0.0, 0.5, lo_open=True)
        check_range(self, "test_fraction", 0.0, 0.5)
        if self.test_fraction > 0 and self.task == "sft":
            from ..errors import ConfigError

            raise ConfigError("test_fraction", "applies to pretraining corpora; fine-tuning data has a val split only")
        return self
