"""Quality of generated text against references: BLEU (sacrebleu), ROUGE-1/2/L F1 (rouge-score), exact
match and, given a local encoder model, BERTScore precision/recall/F1 (bert-score), on greedy
continuations of held-out passages.

BERTScore convention: the `bert_score` package's own `score` with `model_type` = the local model directory,
`num_layers` = the layer whose outputs are compared (default: the model's last layer), no idf weighting and
no baseline rescaling (rescale_with_baseline off: baselines are per-model files the package ships only for
named hub models); P, R and F1 are means over the pairs. Scores from different models or layers are not
comparable.

`continuation_pairs` cuts validation documents into (passage, true continuation) pairs at line
boundaries; `generation_scores` generates greedily from every passage with the engine (batched) and
scores the continuations against the truth.
"""

from __future__ import annotations

import random

from ..errors import UsageError
from ..extras import require
from ..inference import Engine, SamplingParams


def bleu(hypotheses: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing); `references` is one
    reference per hypothesis, or several reference streams (lists as long as `hypotheses`)."""
    sacrebleu = require("sacrebleu", "eval", "BLEU")
    streams = references if references and isinstance(references[0], list) else [references]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    rouge_scorer = require("rouge_score.rouge_scorer", "eval", "ROUGE")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for key, value in scorer.score(ref, hyp).items():
            totals[key] += value.fmeasure
    return {k: v / max(1, len(hypotheses)) for k, v in totals.items()}


def bertscore_layer(model_dir: str, num_layers: int | None = None) -> int:
    """The layer BERTScore compares for the local model `model_dir` (default: its last); UsageError if the
    directory is no transformers model, the layer is out of range or bert-score is not installed."""
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise UsageError(f"--bertscore-model {model_dir}: not a transformers model directory (no config.json)")
    layers = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers")
    num_layers = num_layers or layers
    if not num_layers or (layers and not 1 <= num_layers <= layers):
        raise UsageError(f"--bertscore-layers {num_layers}: {model_dir} has {layers} layers")
    require("bert_score", "bertscore", "BERTScore")
    return num_layers


def bertscore(hypotheses: list[str], references: list[str], model_dir: str, num_layers: int | None = None,
              batch_size: int = 16) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 of `hypotheses` against `references` with the encoder in
    `model_dir` (a transformers directory: config.json, weights, tokenizer), compared at layer `num_layers`
    (default: its last), without idf or baseline rescaling; read offline."""
    num_layers = bertscore_layer(model_dir, num_layers)
    bert_score = require("bert_score", "bertscore", "BERTScore")
    # a pair with an empty side scores 0, the package's own rule (its empty-sentence path fails on the
    # tokenizers of transformers 5, so such pairs are not passed to it)
    scored = [i for i, (h, r) in enumerate(zip(hypotheses, references)) if h.strip() and r.strip()]
    totals = [0.0, 0.0, 0.0]
    if scored:
        p, r, f = bert_score.score([hypotheses[i] for i in scored], [references[i] for i in scored],
                                   model_type=str(model_dir), num_layers=num_layers, lang=None, idf=False,
                                   rescale_with_baseline=False, batch_size=batch_size, verbose=False)
        totals = [float(p.sum()), float(r.sum()), float(f.sum())]
    n = max(1, len(hypotheses))
    return {"bertscore_precision": totals[0] / n, "bertscore_recall": totals[1] / n, "bertscore_f1": totals[2] / n,
            "bertscore_layers": num_layers}


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / max(1, len(references))


def continuation_pairs(texts: list[str], count: int, context_lines: int = 6, target_lines: int = 1,
                       seed: int = 0) -> list[tuple[str, str]]:
    """(passage, continuation) pairs from `texts`, cut at line boundaries, chosen with `seed`."""
    rng = random.Random(seed)
    candidates = []
    for text in texts:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        for i in range(context_lines, len(lines) - target_lines):
            candidates.append(("\n".join(lines[i - context_lines:i]) + "\n", "\n".join(lines[i:i + target_lines])))
    rng.shuffle(candidates)
    return candidates[:count]


def generation_scores(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 32,
                      slots: int = 8, bertscore_model: str | None = None,
                      bertscore_layers: int | None = None) -> dict[str, float]:
    """The metrics of greedy continuations of `pairs`' passages; BERTScore too with `bertscore_model`."""
    engine = Engine(model, tokenizer, slots=slots)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len // 2)
    window = model.config.max_seq_len - max_new_tokens  # the passage's last tokens that leave room to answer
    prompts = [([tokenizer.prefix_id] + tokenizer.encode(passage))[-window:] for passage, _ in pairs]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=("\n",))
    hypotheses = [s.text for s in engine.generate(prompts, params)]
    references = [truth for _, truth in pairs]
    scores = {"bleu": bleu(hypotheses, references), **rouge(hypotheses, references),
              "exact_match": exact_match(hypotheses, references), "pairs": len(pairs)}
    if bertscore_model:
        scores.update(bertscore(hypotheses, references, bertscore_model, bertscore_layers))
    return scores
