"""Data at scale: `blueberry prepare` throughput and memory on generated multi-GB corpora, cache-hit start-up,
and how fast the sharded loader serves batches.

    python benchmarks/data_scale.py [--root /tmp/data_scale] [--sizes-gb 0.5,2] [--workers 1,2]

The corpus: the 38 bundled Shakespeare plays cut into documents of 20-200 consecutive lines from a random
play and place, each varied (two of its words swapped everywhere, e.g. every "king" becomes "night" and
back; some lines reversed word by word), written as 128 MB JSONL files until the size is reached. Seeded,
so the same command makes the same corpus. It is repetitive text, easier for BPE than web text; the
throughput is a property of this machine and tokenizer, not of the corpus's meaning.

Measured, each `blueberry prepare` in its own process (so its peak RSS is its own, from /usr/bin/time):
prepare MB/s of source text at each worker count, peak RSS at each corpus size (the goal: flat, not growing
with the corpus), the start-up of a second prepare of the same corpus (a cache hit decided from the
manifest), and the loader: batches/s of ShardedLoader + read-ahead thread at the GPU preset's batch shape
(32 x 1024 tokens), to compare with the step time it must hide.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, table

FILE_BYTES = 128 * 2**20


def make_corpus(out: Path, size_gb: float, seed: int = 0) -> float:
    """JSONL files of varied Shakespeare documents up to `size_gb`; returns the GB written."""
    from blueberry.data.sources import iter_shakespeare

    out.mkdir(parents=True, exist_ok=True)
    target = int(size_gb * 2**30)
    existing = sum(p.stat().st_size for p in out.glob("*.jsonl"))
    if existing >= target:
        return existing / 2**30
    plays = [d.text.splitlines() for d in iter_shakespeare()]
    words = sorted({w for lines in plays[:5] for line in lines for w in line.split() if w.isalpha()})
    rng = random.Random(seed)
    written, index = 0, 0
    while written < target:
        with open(out / f"part-{index:04d}.jsonl", "w") as f:
            size = 0
            while size < FILE_BYTES and written + size < target:
                text = _document(rng, plays, words)
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line)
        written += size
        index += 1
    return written / 2**30


def _document(rng, plays, words) -> str:
    lines = rng.choice(plays)
    start = rng.randrange(len(lines))
    piece = lines[start:start + rng.randint(20, 200)]
    piece = [" ".join(reversed(l.split())) if rng.random() < 0.05 else l for l in piece]
    text = "\n".join(piece)
    a, b = rng.choice(words), rng.choice(words)
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


def run_prepare(source: Path, store: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS GB) of one `blueberry prepare` process."""
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "blueberry", "prepare", str(source),
           "--out", str(store), "--workers", str(workers), "--bpe-sample-mb", "32"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return seconds, int(re.findall(r"MAXRSS_KB (\d+)", r.stderr)[-1]) / 2**20


def cache_hit_seconds(source: Path, store: Path, workers: int) -> float:
    """The second prepare of the same corpus, in this process: deciding from the manifest that it is done."""
    from blueberry.data.prepare import PrepareSettings, prepare

    t0 = time.perf_counter()
    manifest = prepare(PrepareSettings(str(source), workers=workers, bpe_sample_mb=32), store)
    assert manifest["complete"]
    return time.perf_counter() - t0


def loader_speed(store: Path, batch: int = 32, seq_len: int = 1024, batches: int = 200) -> float:
    from blueberry.data.sharded_loader import Prefetched, ShardedLoader, packed_windows
    from blueberry.data.token_store import open_split

    loader = Prefetched(ShardedLoader(packed_windows(open_split(store, "train"), seq_len), batch, seed=0), depth=4)
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    rate = batches / (time.perf_counter() - t0)
    loader.stop()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/data_scale"))
    ap.add_argument("--sizes-gb", default="0.5,2")
    ap.add_argument("--workers", default="1,2", help="worker counts measured on the smallest corpus")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    for size in sizes:
        source = args.root / f"corpus-{size:g}gb"
        t0 = time.perf_counter()
        gb = make_corpus(source, size)
        print(f"corpus {source}: {gb:.2f} GB ({time.perf_counter() - t0:.0f} s to make)", flush=True)
        counts = workers if size == sizes[0] else [max(workers)]
        for w in counts:
            store = args.root / f"store-{size:g}gb-w{w}"
            subprocess.run(["rm", "-rf", str(store)])
            seconds, rss = run_prepare(source, store, w)
            hit = cache_hit_seconds(source, store, w)
            manifest = json.loads((store / "manifest.json").read_text())
            tokens = sum(s["train"]["tokens"] + s["val"]["tokens"] for s in manifest["shards"])
            row = [f"{gb:.2f}", w, f"{tokens / 1e6:,.0f}M", f"{seconds:.0f}", f"{gb * 1024 / seconds:.1f}",
                   f"{rss:.2f}", f"{hit:.1f}"]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
    print(table(["corpus GB", "workers", "tokens", "prepare s", "MB/s", "peak RSS GB",
                 "cache hit s"], rows))
    last = args.root / f"store-{sizes[-1]:g}gb-w{max(workers)}"
    rate = loader_speed(last)
    print(f"loader: {rate:.0f} batches/s of 32 x 1024 tokens ({1000 / rate:.1f} ms per batch) from {last}")


if __name__ == "__main__":
    main()
