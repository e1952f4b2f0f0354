"""Cross-entropy fused with the output projection, computed a chunk of tokens at a time.

`linear_cross_entropy(h, weight, targets)` equals `F.cross_entropy((h @ weight.T).float(), targets)`
(mean over targets that are not `ignore_index`), but never holds the (tokens, vocab) logits in full:
each chunk's logits are formed in the compute dtype, log-softmaxed in fp32 and, when gradients are
wanted, turned at once into the gradients of `h` and `weight` ((softmax - one_hot) / n); backward
only rescales them by the incoming gradient. That drops the fp32 copy of the logits, the log-softmax
backward pass and the zero-filled logits gradient: the largest non-matmul costs of a small-model
training step (docs/LOG.md, "fused cross-entropy").
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def chunk_rows(vocab: int, device_type: str) -> int:
    """Tokens per chunk. CPU: ~16 MiB of fp32 logits (512 tokens for a 8192 vocabulary), which keeps the
    chunk's matmuls and softmax near the caches (`benchmarks/cross_entropy.py` measures the choice).
    GPU: ~1 GiB, large enough that the chunk loop costs nothing in launches."""
    budget = 2**22 if device_type == "cpu" else 2**28
    return max(64, budget // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, ignore_index, grad_enabled):
        # forward always runs with grad mode off: whether the caller wants gradients is passed in
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        x, w = h.to(dtype), weight.to(dtype)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).to(torch.float32)
        safe_targets = torch.where(valid, targets, 0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_x = torch.empty_like(x) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        step = chunk_rows(w.shape[0], h.device.type)
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            tc = safe_targets[rows].unsqueeze(1)
            logp = torch.log_softmax(x[rows] @ w.t(), dim=-1, dtype=torch.float32)
            scale = valid[rows].to(torch.float32) / count  # 1/n for counted tokens, 0 for ignored
            loss = loss - (logp.gather(1, tc).squeeze(1) * scale).sum()
            if want_h or want_w:
                grad = logp.exp_().scatter_add_(1, tc, -torch.ones_like(tc, dtype=logp.dtype)).to(dtype)
                # the per-token scale goes on the narrow side of each product, not on the logits
                if want_h:
                    grad_x[rows] = (grad @ w) * scale.unsqueeze(1).to(dtype)
                if want_w:
                    grad_w += (grad.t() @ (x[rows] * scale.unsqueeze(1).to(dtype))).float()
        ctx.save_for_backward(grad_x if want_h else None, grad_w if want_w else None)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_x * grad_loss).to(h_dtype) if grad_x is not None else None
        gw = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`; h (..., D), weight (V, D), targets (...).

    The matmuls run in the autocast dtype when autocast is on (else in h's dtype); the softmax in fp32.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), dtype,
                                         ignore_index, torch.is_grad_enabled())
