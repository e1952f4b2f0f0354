"""`blueberry prepare`: turn a document source into a sharded token store (data/prepare.py), resume an
interrupted one, or merge the parts several machines prepared.

    blueberry prepare SOURCE --out STORE [--workers N] [--shard-tokens N] [--tokenizer T | --vocab-size V]
    blueberry prepare SOURCE --out PART_i --shard-index i --num-shards n      (on machine i of n)
    blueberry prepare --merge STORE PART_0 PART_1 ...                         (then train on --dataset STORE)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into a sharded token store (resumable, parallel)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="built-in corpus, file, directory, glob or hf:NAME[:CONFIG]")
    p.add_argument("--out", help="the store directory to write")
    p.add_argument("--merge", nargs="+", metavar="PATH", help="STORE PART... : one store over the parts")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="training tokens per shard")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json or transformers directory (default: "
                   "train a byte-level BPE on a sample of the training documents)")
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the BPE trained here")
    p.add_argument("--bpe-sample-mb", type=float, default=64.0, help="MB of training text the BPE learns from")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (by text hash)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of documents held out as a test split "
                   "(by text hash; scored once when a run ends)")
    p.add_argument("--split-seed", type=int, default=0, help="which documents are held out")
    p.add_argument("--num-documents", type=int, default=None, help="stop after this many documents")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--shard-index", type=int, default=0, help="this machine's part (0..num-shards-1)")
    p.add_argument("--num-shards", type=int, default=1, help="how many machines prepare parts of the source")
    p.add_argument("--debug", action="store_true")


def prepare_command(args) -> int:
    from ..data.prepare import PrepareSettings, prepare
    from ..data.token_store import merge_stores

    if args.merge:
        if len(args.merge) < 2 or args.source or args.out:
            raise UsageError("--merge takes the store to write and then its parts: --merge STORE PART...")
        merged = merge_stores(Path(args.merge[0]), [Path(p) for p in args.merge[1:]])
        print(f"Merged {len(args.merge) - 1} parts into {args.merge[0]}: {len(merged['shards'])} shards")
        return 0
    if not args.source or not args.out:
        raise UsageError("give a SOURCE and --out STORE (or --merge STORE PART...)")
    for name in ("workers", "num_documents", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    settings = PrepareSettings(
        source=args.source, text_field=args.text_field, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed,
        num_documents=args.num_documents,
        max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, workers=args.workers,
        shard_index=args.shard_index, num_shards=args.num_shards, bpe_sample_mb=args.bpe_sample_mb)
    prepare(settings, Path(args.out))
    return 0
