"""Multiple-choice tasks scored by log-likelihood (the HellaSwag / ARC / CORE way).

A task is a JSONL file, one item per line: {"context": str, "choices": [str, ...], "answer": int}
(optionally "fewshot": [{"context", "choices", "answer"}, ...] at the top of the file as a first line
{"fewshot": [...]}, used with num_fewshot > 0). Each choice is scored as a continuation of the context
(`scoring.score`, all choices of all items in one batched pass) by its summed log-likelihood and by
its log-likelihood per character. Reported:
  acc        the highest summed log-likelihood is the answer
  acc_norm   the highest log-likelihood per character of the choice is the answer (lm-eval's acc_norm:
             len(choice) in characters, not bytes; lm-eval calls the per-byte one acc_bytes)
  centered   (acc - chance) / (1 - chance), chance = mean of 1 / number of choices: 0 is guessing, 1 perfect
Built-in tasks (`blueberry/evaluation/tasks/*.jsonl`) are built by `python -m blueberry.evaluation.build_tasks`
from the validation split only; a task may also be given by path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.sources import jsonl_records
from ..errors import UsageError
from .scoring import score

TASK_DIR = Path(__file__).parent / "tasks"


@dataclass
class Task:
    name: str
    items: list[dict]
    fewshot: list[dict] = field(default_factory=list)


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.jsonl"))


def load_task(spec: str) -> Task:
    """A built-in task by name, or a JSONL file by path."""
    path = Path(spec)
    if not path.is_file():
        path = TASK_DIR / f"{spec}.jsonl"
    if not path.is_file():
        raise UsageError(f"--tasks {spec}: neither a built-in task ({', '.join(builtin_tasks())}) nor a file")
    items, fewshot = [], []
    for n, item in jsonl_records(path):
        if isinstance(item, dict) and "fewshot" in item and "context" not in item:
            fewshot = item["fewshot"]
            continue
        _check_item(item, f"{path}:{n}")
        items.append(item)
    if not items:
        raise UsageError(f"{path} holds no items")
    return Task(path.stem, items, fewshot)


def _check_item(item, where: str) -> None:
    ok = (isinstance(item, dict) and isinstance(item.get("context"), str) and isinstance(item.get("choices"), list)
          and len(item["choices"]) >= 2 and all(isinstance(c, str) and c for c in item["choices"])
          and isinstance(item.get("answer"), int) and 0 <= item["answer"] < len(item["choices"]))
    if not ok:
        raise UsageError(f"{where}: an item needs \"context\" (string), \"choices\" (2 or more non-empty "
                         "strings) and \"answer\" (the index of the right choice)")


def _prefix(task: Task, num_fewshot: int) -> str:
    shots = task.fewshot[:num_fewshot]
    return "".join(s["context"] + s["choices"][s["answer"]] + "\n\n" for s in shots)


def evaluate_task(model, tokenizer, task: Task, num_fewshot: int = 0, batch_size: int = 16,
                  limit: int | None = None, encode=None) -> dict:
    """Scores of `task`. `encode(tokenizer, context, choice)` -> (context ids, choice ids); by default the
    context follows the tokenizer's `prefix_id` (end-of-text, as every document does in training; an
    imported model's bos) (`harness.encode_pair` gives lm-eval's encoding instead)."""
    items = task.items[:limit] if limit else task.items
    prefix = _prefix(task, num_fewshot)
    encode = encode or _encode_after_prefix
    pairs, owners = [], []
    for k, item in enumerate(items):
        for choice in item["choices"]:
            pairs.append(encode(tokenizer, prefix + item["context"], choice))
            owners.append(k)
    scores = score(model, pairs, batch_size)
    per_item: list[list[tuple[float, float]]] = [[] for _ in items]
    flat_choices = [c for item in items for c in item["choices"]]
    for (logp, _), k, choice in zip(scores, owners, flat_choices):
        per_item[k].append((logp, logp / max(1, len(choice))))  # per character, as lm-eval's acc_norm
    correct = sum(max(range(len(s)), key=lambda j: s[j][0]) == it["answer"] for s, it in zip(per_item, items))
    correct_norm = sum(max(range(len(s)), key=lambda j: s[j][1]) == it["answer"] for s, it in zip(per_item, items))
    chance = sum(1 / len(it["choices"]) for it in items) / len(items)
    acc, acc_norm = correct / len(items), correct_norm / len(items)
    return {"acc": acc, "acc_norm": acc_norm, "centered": (acc - chance) / (1 - chance), "chance": chance,
            "items": len(items)}


def _encode_after_prefix(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    return [tokenizer.prefix_id] + tokenizer.encode(context), tokenizer.encode(choice)


def evaluate_tasks(model, tokenizer, specs: list[str], **kwargs) -> dict[str, dict]:
    return {task.name: evaluate_task(model, tokenizer, task, **kwargs) for task in map(load_task, specs)}


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| task | items | acc | acc_norm | centered |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['items']} | {r['acc']:.4f} | {r['acc_norm']:.4f} | {r['centered']:.4f} |")
    return "\n".join(lines)
