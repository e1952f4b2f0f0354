"""`DataConfig`: where the text comes from, how it is tokenized, split and cut into training windows."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import DATASET_TYPES, check_choices, check_positive, check_range, setting


@dataclass
class DataConfig:
    task: str = setting("pretrain", "pretrain: next-token prediction on documents; sft: supervised fine-tuning on "
                                    "a .jsonl of conversations (loss on the assistant's tokens only)",
                        choices=("pretrain", "sft"))
    dataset: str = setting("shakespeare", "shakespeare, python-docs, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet "
                                          "file or directory")
    dataset_type: str = setting("packed", "how training windows are cut", choices=DATASET_TYPES)
    tokenizer: str | None = setting(None, "a tokenizer.json or a local AutoTokenizer directory (default: train a "
                                          "byte-level BPE on the training split)")
    text_field: str = setting("text", "JSONL field / parquet column holding the text")
    num_documents: int | None = setting(None, "use at most this many documents")
    max_tokens: int | None = setting(None, "use at most this many tokens")
    val_fraction: float = setting(0.1, "fraction of documents held out for validation")
    split_seed: int = setting(0, "which documents are held out (separate from --seed so runs share a val set)")
    stride: int | None = setting(None, "text_token windows: tokens between starts (default seq_len // 2)")
    document_mask: bool = setting(False, "no attention across document boundaries")
    cache_dir: str = setting("data_cache", "where tokenized corpora are cached")

    def validate(self) -> "DataConfig":
        check_positive(self, "stride", "num_documents", "max_tokens", optional=True)
        check_choices(self)
        check_range(self, "val_fraction", 0.0, 0.5, lo_open=True)
        return self
