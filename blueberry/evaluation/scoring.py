"""Log-likelihood scoring of continuations, batched: what multiple-choice tasks and the lm-eval backend
ask of a model.

`score(model, pairs)` takes (context ids, continuation ids) pairs and returns, for each, the summed
log-probability of the continuation given the context and whether it is the greedy continuation (each
of its tokens the argmax). Pairs are sorted by length and right-padded into batches; one forward per
batch; the context is cut from the left when context + continuation exceed the model's window (a continuation
longer than the window is scored on its last window - 1 tokens, as lm-eval's hf backend does).
`rolling_loglikelihood` scores a whole text in non-overlapping windows (perplexity tasks).
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


@torch.no_grad()
def rolling_loglikelihood(model, ids: list[int], bos: int) -> float:
    """Sum of log p(token | preceding tokens) over all of `ids`, in windows of the model's context; each
    window after the first is predicted from a fresh start (bos), so every token is scored once."""
    window = model.config.max_seq_len
    total = 0.0
    for start in range(0, len(ids), window):
        piece = ids[start:start + window]
        inputs = torch.tensor([[bos] + piece[:-1]], device=_device(model))
        logp = torch.log_softmax(model(inputs).logits.float()[0], -1)
        total += float(logp.gather(1, torch.tensor(piece, device=logp.device)[:, None]).sum())
    return total
