"""Tokenization throughput per worker: `tokenizers`' batch encoding and one document at a time, against
the same BPE run by tiktoken (what `blueberry prepare` uses: data/fast_encode.py), side by side, with the
ids compared. One thread per encoder (RAYON_NUM_THREADS=1 is set before `tokenizers` loads), as each
`prepare` worker process runs.

    python benchmarks/tokenize_speed.py [--dataset shakespeare] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread per encoder, before tokenizers is imported

from common import table

from blueberry.data import load_documents, train_bpe
from blueberry.data.fast_encode import fast_encoder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="shakespeare")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    docs = [d.text for d in load_documents(args.dataset)]
    mb = sum(len(t.encode()) for t in docs) / 1e6
    t0 = time.perf_counter()
    tok = train_bpe(docs, args.vocab_size)
    train_s = time.perf_counter() - t0
    rows = [["BPE training", f"{train_s:.2f}", f"{mb / train_s:.2f}"]]
    fast = fast_encoder(tok, docs[:20])
    assert fast is not None, "the trained BPE should convert to tiktoken"
    assert fast(docs) == tok.encode_batch(docs), "tiktoken's ids differ from tokenizers'"
    for name, fn in (("tokenizers encode_batch", lambda: tok.encode_batch(docs)),
                     ("tokenizers one by one", lambda: [tok.encode(t) for t in docs]),
                     ("tiktoken (prepare)", lambda: fast(docs))):
        t0 = time.perf_counter()
        fn()
        s = time.perf_counter() - t0
        rows.append([name, f"{s:.2f}", f"{mb / s:.2f}"])
    print(f"{args.dataset}: {len(docs)} documents, {mb:.1f} MB, vocabulary {args.vocab_size}; ids identical")
    print(table(["step", "seconds", "MB/s"], rows))


if __name__ == "__main__":
    main()
