"""Tokenization throughput: batch encoding (what the data pipeline uses) vs one document at a time.

    python benchmarks/tokenize_speed.py [--dataset shakespeare]
"""

from __future__ import annotations

import argparse
import time

from common import table

from blueberry.data import load_documents, train_bpe


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
    for name, fn in (("encode_batch (pipeline)", lambda: tok.encode_batch(docs)),
                     ("encode one by one", lambda: [tok.encode(t) for t in docs])):
        t0 = time.perf_counter()
        fn()
        s = time.perf_counter() - t0
        rows.append([name, f"{s:.2f}", f"{mb / s:.2f}"])
    print(f"{args.dataset}: {len(docs)} documents, {mb:.1f} MB")
    print(table(["step", "seconds", "MB/s"], rows))


if __name__ == "__main__":
    main()
