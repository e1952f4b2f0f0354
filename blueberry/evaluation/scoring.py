"""Log-likelihood scoring of continuations, batched: what multiple-choice tasks and the lm-eval backend
ask of a model.

`score(model, pairs)` takes (context ids, continuation ids) pairs and returns, for each, the summed
log-probability of the continuation given the context and whether it is the greedy continuation (each
of its tokens the argmax). Pairs are sorted by length and right-padded into batches; one forward per
batch; the context is cut from the left when context + continuation exceed the model's window (a continuation
longer than the window is scored on its last window - 1 tokens, as lm-eval's hf backend does).
`rolling_loglikelihood` scores a whole text in lm-eval's rolling windows (perplexity tasks): each token
once, every window after the first keeping the preceding tokens as its context.
"""

from __future__ import annotations

import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[tuple[float, bool]]:
    window = model.config.max_seq_len
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("a continuation must have at least one token")
        ids = (list(context) + list(continuation))[-(window + 1):]
        rows.append((ids, min(len(continuation), len(ids) - 1)))  # longer than the window: its last part
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i][0]) for i in chunk) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)  # the positions predicting a continuation
        for r, i in enumerate(chunk):
            ids, n = rows[i]
            inputs[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            scored[r, len(ids) - 1 - n:len(ids) - 1] = True
        device = _device(model)
        logits = model(inputs.to(device), logits_at=scored.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()  # (scored positions, vocab), row by row
        start_row = 0
        for r, i in enumerate(chunk):
            ids, n = rows[i]
            targets = torch.tensor(ids[-n:])
            token_logp = logp[start_row:start_row + n]
            start_row += n
            total = float(token_logp.gather(1, targets[:, None]).sum())
            greedy = bool((token_logp.argmax(-1) == targets).all())
            results[i] = (total, greedy)
    return results


def rolling_windows(ids: list[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows (`get_rolling_token_windows` with context_len=1, then
    `make_disjoint_window`), as (context, continuation) pairs: the first window predicts its tokens after
    `prefix`; each later one predicts the next `window` tokens (the last one: what is left) after as many
    preceding tokens as the window still holds. Every token is predicted once."""
    if not ids:
        return []
    first = min(window, len(ids))
    pairs = [([prefix], list(ids[:first]))]
    predicted = first
    while predicted < len(ids):
        n = min(len(ids) - predicted, window)
        end = predicted + n
        pairs.append((list(ids[end - window - 1:end - n]), list(ids[end - n:end])))
        predicted += n
    return pairs


def rolling_loglikelihood(model, ids: list[int], prefix: int, batch_size: int = 16) -> float:
    """Sum of log p(token | preceding tokens) over all of `ids`, in lm-eval's rolling windows."""
    return sum(logp for logp, _ in score(model, rolling_windows(ids, prefix, model.config.max_seq_len), batch_size))
