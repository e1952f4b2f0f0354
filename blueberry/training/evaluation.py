"""`evaluate_model`: validation loss, accuracy, perplexity, bits per byte, tokens/s, MFU, expert load.

Bits per byte = (sum of target-token losses in nats) / ln 2 / (UTF-8 bytes of those target tokens),
independent of the tokenizer. MFU here is forward-only: 2 * active params + 4 * layers * d_model * seq
FLOPs per token (one third of the training formula), over the device's peak (system/capabilities.py).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_model(model, val_loader, config, token_bytes: np.ndarray | None = None, precision=None,
                   device=None, peak_flops: float | None = None) -> dict:
    core = getattr(model, "module", model)
    device = device or next(core.parameters()).device
    was_training = model.training
    model.eval()
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    tb = torch.as_tensor(token_bytes, device=device) if token_bytes is not None else None
    total_nats, total_tokens, correct, total_bytes = 0.0, 0, 0, 0
    loads = None
    start = time.perf_counter()
    for batch in val_loader:
        x, y = batch[0].to(device), batch[1].to(device)
        doc_ids = batch[2].to(device) if len(batch) > 2 else None
        with autocast:
            out = model(x, doc_ids=doc_ids)
        logits = out.logits.float()
        nats = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="none")
        total_nats += nats.sum().item()
        total_tokens += y.numel()
        correct += (logits.argmax(-1) == y).sum().item()
        if tb is not None:
            total_bytes += tb[y].sum().item()
        if out.expert_load:
            layer_load = torch.stack(out.expert_load).float().cpu()
            loads = layer_load if loads is None else loads + layer_load
    elapsed = max(time.perf_counter() - start, 1e-9)
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the validation loader produced no batches")
    loss = total_nats / total_tokens
    result = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct / total_tokens,
        "tokens": total_tokens,
        "tokens_per_sec": total_tokens / elapsed,
    }
    if total_bytes:
        result["bits_per_byte"] = total_nats / math.log(2) / total_bytes
    if hasattr(core, "flops_per_token") and peak_flops:
        result["mfu"] = core.flops_per_token(config.max_seq_len) / 3 * result["tokens_per_sec"] / peak_flops
    if loads is not None:
        result["expert_load"] = (loads / len(val_loader)).tolist()
    return result
