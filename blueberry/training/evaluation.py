"""`evaluate_model`: validation loss, accuracy, perplexity, bits per byte, tokens/s, MFU, expert load.

Every figure is a ratio of totals, so that several processes give the figures of the whole set:
  loss           sum of target-token losses (nats) / scored targets
  bits per byte  sum of the losses of targets that stand for bytes (special tokens such as end-of-text
                 stand for none, so they enter neither side) / ln 2 / their UTF-8 bytes
  tokens/s       scored targets of every rank / the ranks' (side-by-side) mean time
Targets equal to -100 are not scored (the `document` validation set marks a token scored by an
earlier window that way). MFU here is forward-only: one third of the training FLOPs per token.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.cross_entropy import IGNORE_INDEX
from .distributed import unwrap


class _OneProcess:
    world_size = 1

    @staticmethod
    def all_reduce_sum(values: list[float]) -> list[float]:
        return values


@torch.no_grad()
def evaluate_model(model, val_loader, config, token_bytes: np.ndarray | None = None, precision=None,
                   device=None, peak_flops: float | None = None, ranks=_OneProcess) -> dict:
    """Score every batch of `val_loader`. Under torchrun `ranks` (a DistContext) sums the totals of every
    process, each having scored its share; `peak_flops` is then the peak of all of them together."""
    core = unwrap(model)
    device = device or next(core.parameters()).device
    was_training = model.training
    model.eval()
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    tb = torch.as_tensor(token_bytes, device=device) if token_bytes is not None else None
    totals = torch.zeros(6, dtype=torch.float64)  # nats, targets, correct, nats of byte tokens, bytes, seconds
    loads = None
    start = time.perf_counter()
    for batch in val_loader:
        x, y = batch[0].to(device), batch[1].to(device)
        doc_ids = batch[2].to(device) if len(batch) > 2 else None
        with autocast:
            out = model(x, doc_ids=doc_ids)
        totals += _batch_totals(out.logits, y, tb)
        if out.expert_load:
            layer_load = torch.stack(out.expert_load).float().cpu()
            loads = layer_load if loads is None else loads + layer_load
    totals[5] = time.perf_counter() - start
    model.train(was_training)
    nats, targets, correct, byte_nats, num_bytes, seconds = ranks.all_reduce_sum(totals.tolist())
    seconds /= ranks.world_size  # the ranks ran side by side: their mean time is the wall time
    if targets == 0:
        raise ValueError("the validation loader produced no batches")
    loss = nats / targets
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / targets,
              "tokens": int(targets), "tokens_per_sec": targets / max(seconds, 1e-9)}
    if num_bytes:
        result["bits_per_byte"] = byte_nats / math.log(2) / num_bytes
    if hasattr(core, "flops_per_token") and peak_flops:
        result["mfu"] = core.flops_per_token(config.model.max_seq_len) / 3 * result["tokens_per_sec"] / peak_flops
    if loads is not None:
        result["expert_load"] = (loads / len(val_loader)).tolist()
    return result


def _batch_totals(logits: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float().view(-1, logits.shape[-1])
    y = y.reshape(-1)
    scored = y != IGNORE_INDEX
    nats = F.cross_entropy(logits, y, reduction="none", ignore_index=IGNORE_INDEX)
    correct = ((logits.argmax(-1) == y) & scored).sum()
    if token_bytes is not None:
        nbytes = torch.where(scored, token_bytes[y.clamp(min=0)], 0)
        byte_nats, num_bytes = nats[nbytes > 0].sum(), nbytes.sum()
    else:
        byte_nats = num_bytes = torch.zeros((), device=y.device)
    parts = (nats.sum(), scored.sum(), correct, byte_nats, num_bytes, torch.zeros((), device=y.device))
    return torch.stack([p.double() for p in parts]).cpu()
