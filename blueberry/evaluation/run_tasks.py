"""Task scores inside a training run: which tasks a run scores (`eval_tasks`), and the scorer the
training loop calls at its final (or every) evaluation. The command line hands the scorer to
`run_training`, so that training code needs no import of this package."""

from __future__ import annotations

import time

from ..training.precision import choose_precision
from .tasks import builtin_tasks, evaluate_task, load_task

AUTO_TASKS = {"shakespeare": ("shakespeare-next-line", "shakespeare-speaker"),
              "python-docs": ("python-docs-next-line",)}


def task_names(config) -> list[str]:
    spec = (config.training.eval_tasks or "none").strip()
    if spec == "none":
        return []
    if spec == "auto":
        return [t for t in AUTO_TASKS.get(config.data.dataset, ()) if t in builtin_tasks()]
    return [t.strip() for t in spec.split(",") if t.strip()]


def task_scorer_factory(config, tokenizer):
    """A function model -> {"<task>/acc": ..., "<task>/acc_norm": ..., "<task>/centered": ...}, or None."""
    tasks = [load_task(name) for name in task_names(config)]  # bad names fail now, not at the end
    if not tasks:
        return None

    precision = choose_precision(config, config.capabilities())  # the run's own, as its validation uses

    def score_tasks(model) -> dict:
        was_training = model.training
        model.eval()
        try:
            out = {}
            for task in tasks:
                with precision.autocast():
                    result = evaluate_task(model, tokenizer, task, batch_size=config.training.batch_size)
                out.update({f"{task.name}/{k}": result[k] for k in ("acc", "acc_norm", "centered")})
            return out
        finally:
            model.train(was_training)

    def estimate_seconds(model) -> float:
        """Seconds the scoring will take, extrapolated from timing its first two batches of every task (a time
        budget reserves them)."""
        was_training = model.training
        model.eval()
        seconds = 0.0
        try:
            for task in tasks:
                per_item = max(1, len(task.items[0]["choices"]))
                limit = min(len(task.items), max(1, -(-2 * config.training.batch_size // per_item)))
                start = time.perf_counter()
                with precision.autocast():
                    evaluate_task(model, tokenizer, task, batch_size=config.training.batch_size, limit=limit)
                seconds += (time.perf_counter() - start) * len(task.items) / limit
        finally:
            model.train(was_training)
        return seconds

    score_tasks.estimate_seconds = estimate_seconds
    return score_tasks
