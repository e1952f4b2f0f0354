"""Quality of generated text against references: BLEU (sacrebleu), ROUGE-1/2/L F1 (rouge-score) and
exact match, on greedy continuations of held-out passages.

`continuation_pairs` cuts validation documents into (passage, true continuation) pairs at line
boundaries; `generation_scores` generates greedily from every passage with the engine (batched) and
scores the continuations against the truth.
"""

from __future__ import annotations

import random

from ..inference import Engine, SamplingParams


def bleu(hypotheses: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing); `references` is one
    reference per hypothesis, or several reference streams (lists as long as `hypotheses`)."""
    import sacrebleu

    streams = references if references and isinstance(references[0], list) else [references]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for key, value in scorer.score(ref, hyp).items():
            totals[key] += value.fmeasure
    return {k: v / max(1, len(hypotheses)) for k, v in totals.items()}


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
                      slots: int = 8) -> dict[str, float]:
    engine = Engine(model, tokenizer, slots=slots)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len // 2)
    window = model.config.max_seq_len - max_new_tokens  # the passage's last tokens that leave room to answer
    prompts = [([tokenizer.eot_id] + tokenizer.encode(passage))[-window:] for passage, _ in pairs]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=("\n",))
    hypotheses = [s.text for s in engine.generate(prompts, params)]
    references = [truth for _, truth in pairs]
    return {"bleu": bleu(hypotheses, references), **rouge(hypotheses, references),
            "exact_match": exact_match(hypotheses, references), "pairs": len(pairs)}
