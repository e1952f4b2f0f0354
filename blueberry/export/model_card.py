"""The model card (README.md) of an exported transformers directory, so that it stands on its own on the Hub.

YAML front matter (license, library_name, pipeline_tag, tags, datasets when the run's dataset is a Hub
id), then: the data, the recipe (architecture, sizes, steps, tokens, optimizer), the figures of the run's
summary.json and eval.json when present, and how to load the directory with transformers and with
blueberry. Everything is read from the run directory; nothing is invented when a file is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runs.layout import CONFIG, SUMMARY


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def hub_dataset_id(dataset: str | None) -> str | None:
    """The dataset as a Hub id (owner/name) when it looks like one and is not a local path."""
    if not dataset or dataset.startswith((".", "/", "~")) or Path(dataset).exists():
        return None
    parts = dataset.split("/")
    return dataset if len(parts) == 2 and all(parts) else None


def _front_matter(license: str, arch: str, config: dict) -> str:
    tags = ["blueberry", "text-generation", arch.removesuffix("ForCausalLM").lower()]
    if config.get("model_type") == "moe":
        tags.append("mixture-of-experts")
    lines = ["---", f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags]
    dataset = hub_dataset_id(config.get("dataset"))
    if dataset:
        lines += ["datasets:", f"- {dataset}"]
    return "\n".join(lines + ["---", ""])


def _recipe(config: dict, arch: str, params: dict, summary: dict) -> list[str]:
    steps = summary.get("step", config.get("max_steps"))
    per_step = ((config.get("batch_size") or 0) * (config.get("grad_accum_steps") or 1)
                * (config.get("max_seq_len") or 0))
    rows = [("Architecture", f"{arch} ({config.get('model_type')}: {config.get('n_layers')} layers, d_model "
                             f"{config.get('d_model')}, {config.get('n_heads')} heads, {config.get('n_kv_heads')} "
                             f"key/value heads)"),
            ("Parameters", f"{params['total']:,} total, {params['active_per_token']:,} active per token"),
            ("Context", f"{config.get('max_seq_len')} tokens"), ("Vocabulary", f"{config.get('vocab_size')} tokens")]
    if config.get("model_type") == "moe":
        rows.append(("Experts", f"{config.get('num_experts')}, {config.get('expert_top_k')} per token"
                                f"{', plus a shared expert' if config.get('shared_expert') else ''}"))
    rows += [("Steps", f"{steps}"), ("Training tokens", f"{steps * per_step:,}" if steps and per_step else "unknown"),
             ("Optimizer", f"{config.get('optimizer')} (lr {config.get('lr')}, schedule {config.get('schedule')}, "
                           f"weight decay {config.get('weight_decay')})"),
             ("Batch", f"{config.get('batch_size')} sequences x {config.get('grad_accum_steps') or 1} accumulation")]
    return ["## Recipe", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _results(summary: dict, evaluation: dict) -> list[str]:
    lines = ["## Results", ""]
    keys = ("loss", "perplexity", "accuracy", "bits_per_byte", "best_val_loss")
    figures = [(k, summary[k]) for k in keys if isinstance(summary.get(k), (int, float))]
    if figures:
        lines += ["On the run's validation split (summary.json):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in figures] + [""]
    if evaluation:
        lines += [f"`blueberry eval` on {evaluation.get('source', 'its data')} (eval.json):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {evaluation[k]:.4f} |" for k in keys if isinstance(evaluation.get(k), (int, float))]
        for task, result in (evaluation.get("tasks") or {}).items():
            score = result.get("accuracy") if isinstance(result, dict) else result
            if isinstance(score, (int, float)):
                lines.append(f"| {task} accuracy | {score:.4f} |")
        lines.append("")
    if not figures and not evaluation:
        lines += ["The run has no summary.json or eval.json: no figures to report.", ""]
    return lines


def _usage(repo: str | None) -> list[str]:
    """Loading examples: from the Hub id `repo`, else from the directory itself."""
    where = repo or "path/to/this/directory"
    local = repo.split("/")[-1] if repo else where
    fetch = [f"hf download {repo} --local-dir {local}"] if repo else []
    return ["## Use", "", "With transformers:", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tok = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            'ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,',
            '                              return_tensors="pt", return_dict=True)["input_ids"]',
            "print(tok.decode(model.generate(ids, max_new_tokens=50)[0]))", "```", "",
            "With blueberry (the directory becomes a run you can generate from, evaluate or train further):", "",
            "```bash", *fetch, f"blueberry import {local} my-run",
            'blueberry generate --checkpoint my-run --prompt "Once"',
            "```", ""]


def model_card(run_dir: Path | None, arch: str, params: dict, license: str, name: str | None = None,
               repo: str | None = None) -> str:
    """README.md text for an export of the run in `run_dir` (its config.json, summary.json, eval.json);
    `repo`, the Hub id it is pushed to, goes into the loading examples (else a placeholder path)."""
    run_dir = Path(run_dir) if run_dir else None
    config = _read_json(run_dir / CONFIG) if run_dir else {}
    summary = _read_json(run_dir / SUMMARY) if run_dir else {}
    evaluation = _read_json(run_dir / "eval.json") if run_dir else {}
    title = name or (run_dir.name if run_dir else "model")
    dataset = config.get("dataset")
    shown = hub_dataset_id(dataset) or (Path(dataset).name if dataset else "unknown")
    tokenizer = f"the tokenizer {config['tokenizer']}" if config.get("tokenizer") else "a byte-level BPE trained on it"
    lines = [_front_matter(license, arch, config), f"# {title}", "",
             f"A {arch} language model trained with Blueberry and exported with `blueberry export --format hf`.", "",
             "## Data", "", f"Trained on `{shown}` ({config.get('dataset_type') or 'text'}), tokenized with "
             f"{tokenizer} ({config.get('vocab_size')} tokens); {config.get('val_fraction')} of the documents held "
             "out for validation.", ""]
    lines += _recipe(config, arch, params, summary) + _results(summary, evaluation) + _usage(repo)
    return "\n".join(lines)
