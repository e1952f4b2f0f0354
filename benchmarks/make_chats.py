"""Generate a local chat dataset from the bundled plays, for the SFT example (no download needed).

    python benchmarks/make_chats.py OUT.jsonl [--count 3000]

Each conversation asks about a line of a play: who speaks it ("Who says: ...?" -> "HAMLET."), or what
comes next ("Continue: ..." -> the next line). Lines come from the training plays only (the default
split), so the validation plays stay unseen. A third of the records use {"prompt", "completion"}, the
rest {"messages": [...]} with a system message, so both formats are exercised.
"""

from __future__ import annotations

import argparse
import json
import random
import re

from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from blueberry.data.corpus import split_documents
from blueberry.data.sources import load_documents

SPEAKER = re.compile(r"^([A-Z][A-Z' .-]{1,30})$")


def speeches(texts):
    for text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines[:-2]):
            if SPEAKER.match(line.strip()) and lines[i + 1].strip() and lines[i + 2].strip():
                yield line.strip(), lines[i + 1].strip(), lines[i + 2].strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--count", type=int, default=3000)
    args = p.parse_args()
    train, _ = split_documents(load_documents("shakespeare", "text"), 0.1, 0)
    pool = list(speeches(d.text for d in train))
    rng = random.Random(0)
    with open(args.out, "w", encoding="utf-8") as f:
        for k in range(args.count):
            speaker, line, following = rng.choice(pool)
            if k % 2:
                question, answer = f"Who says: {line}", f"{speaker.title()}."
            else:
                question, answer = f"Continue: {line}", following
            if k % 3 == 0:
                record = {"prompt": question, "completion": answer}
            else:
                record = {"messages": [{"role": "system", "content": "You answer questions about Shakespeare."},
                                       {"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]}
            f.write(json.dumps(record) + "\n")
    print(f"{args.out}: {args.count} conversations from {len(pool)} speeches of the training plays")


if __name__ == "__main__":
    main()
