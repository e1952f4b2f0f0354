"""Build the shipped multiple-choice tasks from the validation split of the bundled corpora, and nothing
else: `python -m blueberry.evaluation.build_tasks` (deterministic; rewrites blueberry/evaluation/tasks/).

  shakespeare-next-line  a passage of a held-out play, and 4 lines: which one truly follows it
                         (the 3 others are lines from elsewhere in the held-out plays)
  shakespeare-speaker    the dialogue before a speech and its first line: which of 4 characters of
                         that play speaks it
  python-docs-next-line  the same as next-line, on the held-out pages of the Python documentation
The split is the one every run uses by default (val_fraction 0.1, split_seed 0): a model trained with
the defaults never saw these texts. Training with another --split-seed or --val-fraction voids that.
"""

from __future__ import annotations

import json
import random
import re

from ..data.corpus import split_documents
from ..data.sources import load_documents
from .tasks import TASK_DIR

ITEMS = 300
VAL_FRACTION, SPLIT_SEED = 0.1, 0  # the defaults of DataConfig
SPEAKER = re.compile(r"^([A-Z][A-Z' .-]{1,30})$")
# editors' notes in the source text (the Python docs have a few): not prose a model should predict
_MARKERS = re.compile(r"\b(TODO|FIXME|XXX)\b")


def held_out(dataset: str) -> list[str]:
    _, val = split_documents(load_documents(dataset, "text"), VAL_FRACTION, SPLIT_SEED)
    return [d.text for d in val]


def next_line_items(texts: list[str], rng: random.Random, context_lines: int = 8) -> list[dict]:
    lines_of = [[ln for ln in t.splitlines() if len(ln.strip()) > 12 and not _MARKERS.search(ln)] for t in texts]
    pool = [ln for lines in lines_of for ln in lines]
    items = []
    while len(items) < ITEMS:
        lines = rng.choice([ls for ls in lines_of if len(ls) > context_lines + 1])
        i = rng.randrange(context_lines, len(lines))
        truth = lines[i]
        distractors = set()
        while len(distractors) < 3:
            d = rng.choice(pool)
            if d != truth:
                distractors.add(d)
        choices = [truth, *sorted(distractors)]
        rng.shuffle(choices)
        items.append({"context": "\n".join(lines[i - context_lines:i]) + "\n", "choices": choices,
                      "answer": choices.index(truth)})
    return items


def speaker_items(texts: list[str], rng: random.Random, context_lines: int = 8) -> list[dict]:
    items = []
    plays = []
    for text in texts:
        lines = text.splitlines()
        speeches = [i for i, ln in enumerate(lines) if SPEAKER.match(ln.strip()) and i + 1 < len(lines)
                    and lines[i + 1].strip() and i >= context_lines]
        names = sorted({lines[i].strip() for i in speeches})
        if len(names) >= 4:
            plays.append((lines, speeches, names))
    while len(items) < ITEMS:
        lines, speeches, names = rng.choice(plays)
        i = rng.choice(speeches)
        truth, first_line = lines[i].strip(), lines[i + 1]
        others = rng.sample([n for n in names if n != truth], 3)
        choices = [truth, *others]
        rng.shuffle(choices)
        items.append({"context": "\n".join(lines[i - context_lines:i]) + "\n",
                      "choices": [f"{name}\n{first_line}" for name in choices], "answer": choices.index(truth)})
    return items


def main() -> None:
    TASK_DIR.mkdir(parents=True, exist_ok=True)
    plays, docs = held_out("shakespeare"), held_out("python-docs")
    tasks = {"shakespeare-next-line": next_line_items(plays, random.Random(1)),
             "shakespeare-speaker": speaker_items(plays, random.Random(2)),
             "python-docs-next-line": next_line_items(docs, random.Random(3))}
    for name, items in tasks.items():
        path = TASK_DIR / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        print(f"{path}: {len(items)} items")


if __name__ == "__main__":
    main()
