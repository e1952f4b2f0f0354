"""Causal self-attention for training-shaped inputs: PyTorch's SDPA, except where three batched matmuls
are faster.

On a CPU, in bf16, PyTorch's SDPA runs a flash-attention kernel whose backward is slow at short sequences
(`benchmarks/attention_cpu.py` times both). There, `causal_attention` computes the scores with one
`baddbmm` (scaled q k^T plus an additive causal mask, in bf16), a softmax in fp32 stored as bf16, and one
`bmm` with v: the numerics of transformers' eager attention. The scores cost memory quadratic in the sequence,
so the form is used up to `MATMUL_FORM_MAX_SEQ` tokens; longer sequences, fp32, GPUs and masks other than
plain causal go to SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MATMUL_FORM_MAX_SEQ = 512  # scores of (batch * heads, seq, seq): beyond this the memory outweighs the speed


def matmul_form_applies(device_type: str, dtype: torch.dtype, seq_len: int, dropout_p: float) -> bool:
    """Whether plain causal attention of these inputs takes the matmul form (and holds its scores)."""
    return device_type == "cpu" and dtype == torch.bfloat16 and dropout_p == 0.0 and seq_len <= MATMUL_FORM_MAX_SEQ


def uses_matmul_form(q: torch.Tensor, dropout_p: float) -> bool:
    return matmul_form_applies(q.device.type, q.dtype, q.shape[-2], dropout_p)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for q (batch, heads, seq, d) and k, v (batch, kv_heads, seq,
    d), kv_heads dividing heads (grouped-query attention)."""
    if not uses_matmul_form(q, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                              enable_gqa=k.shape[1] != q.shape[1])
    batch, heads, seq, dim = q.shape
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    mask = torch.full((seq, seq), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(mask, q.reshape(-1, seq, dim), k.reshape(-1, seq, dim).transpose(1, 2),
                           alpha=dim ** -0.5)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, v.reshape(-1, seq, dim)).view(batch, heads, seq, dim)
