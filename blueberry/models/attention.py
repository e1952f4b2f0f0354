"""Causal self-attention on `F.scaled_dot_product_attention`, with GQA, QK-norm, document masks and a static,
position-indexed KV cache for generation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import causal_attention
from ..ops.matmul import inference_linear
from .layers import RMSNorm, RotaryEmbedding, stored_transposed


class KVCache:
    """Pre-allocated keys and values of one layer for `batch` sequences: (batch, kv_heads, max_len, head_dim).

    Tokens are written at explicit positions (batch, seq): the sequences of a batch may be at different
    lengths, a row can be refilled from position 0 for a new sequence, and speculative decoding rolls
    back by writing over rejected positions. A query at position p sees the keys at positions <= p of
    its own row; whatever a row holds beyond that is never read. Only a cache made `with_validity()`
    (Mixture-of-Depths, whose skipped tokens are written but not attended to) keeps which positions
    may be seen; in any other every written position may."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype,
                 k: torch.Tensor | None = None, v: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 key_positions: torch.Tensor | None = None):
        self.k = k if k is not None else torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = v if v is not None else torch.zeros_like(self.k)
        self.valid = valid  # (batch, max_len) bool, or None: every written position may be attended to
        self.key_positions = (key_positions if key_positions is not None
                              else torch.arange(self.k.shape[2], device=self.k.device))

    def with_validity(self) -> "KVCache":
        """This cache, keeping which written positions later queries may see (`write`'s `keep`)."""
        if self.valid is None:
            self.valid = torch.ones(self.k.shape[0], self.k.shape[2], dtype=torch.bool, device=self.k.device)
        return self

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, start: int, end: int, length: int | None = None) -> "KVCache":
        """A view of rows start..end-1 and, with `length`, of positions 0..length-1 only (writes go to this
        cache's storage). Queries then attend over `length` keys instead of max_len: a caller that knows
        no row is past position length-1 saves the attention over the rest."""
        length = self.max_len if length is None else length
        valid = None if self.valid is None else self.valid[start:end, :length]
        return KVCache(0, 0, 0, 0, None, None, k=self.k[start:end, :, :length], v=self.v[start:end, :, :length],
                       valid=valid, key_positions=self.key_positions[:length])

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              keep: torch.Tensor | None = None) -> None:
        """k, v (batch, kv_heads, seq, head_dim) stored at `positions` (batch, seq); `keep` (batch, seq) marks
        the keys later queries may see (default: all; only a cache `with_validity()` takes it)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        if self.valid is not None:
            self.valid[rows, positions] = True if keep is None else keep
        elif keep is not None:
            raise ValueError("this KV cache keeps no validity: make it with_validity() to write `keep`")

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(batch, 1, seq, max_len): query at position p sees the valid keys at positions <= p, and its own."""
        key, query = self.key_positions.view(1, 1, 1, -1), positions.view(positions.shape[0], 1, -1, 1)
        if self.valid is None:
            return key <= query
        return ((key <= query) & self.valid[:, None, None, :]) | (key == query)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean mask: causal, and a token sees only tokens of its own document."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def training_mask(seq: int, device, doc_ids: torch.Tensor | None, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch or 1, 1, seq, seq): causal, within documents if `doc_ids`, only to keys where `key_mask`
    (batch, seq) is set — and always to the query's own position (a row is never empty)."""
    mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
    if doc_ids is not None:
        mask = mask & document_causal_mask(doc_ids)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    return mask | torch.eye(seq, dtype=torch.bool, device=device)[None, None]


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, n_kv_heads: int | None = None,
                 qk_norm: bool = False, rope_theta: float = 10000.0, dropout: float = 0.0,
                 norm_eps: float = 1e-5, head_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)
        self.dropout = dropout
        self.qkv_weight = self.qkv_bias = self.qk_norm_weight = None

    def fuse_projections(self, transposed: bool = False) -> None:
        """For inference: store q, k and v projections as row blocks of one matrix (the three weights become
        views of it, so no memory is added), and multiply by it once. Small decode steps are bounded by the
        number of matmul calls more than by their size. `transposed`: the matrix stored by input rows
        (`layers.stored_transposed`)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_weight is not None or not all(type(p) is nn.Linear for p in projections):
            return
        fused = torch.cat([p.weight.detach() for p in projections])
        fused = stored_transposed(fused) if transposed else fused
        start = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
            start += rows
        self.qkv_weight = fused
        self.qkv_bias = torch.cat([p.bias.detach() for p in projections]) if self.q_proj.bias is not None else None
        if self.q_norm is not None:  # each head's norm weight, q's heads then k's (see _fused_qkv)
            self.qk_norm_weight = torch.cat([self.q_norm.weight.detach().expand(self.n_heads, -1),
                                             self.k_norm.weight.detach().expand(self.n_kv_heads, -1)])

    def _fused_qkv(self, x: torch.Tensor, positions: torch.Tensor | None):
        """q, k, v (batch, heads, seq, head_dim) after `fuse_projections`: one matmul for the three
        projections, and q's and k's heads normalised and rotated together (the same arithmetic per head
        as q_norm, k_norm and the rotary embedding apart, in fewer operations)."""
        batch, seq, _ = x.shape
        heads = inference_linear(x, self.qkv_weight, self.qkv_bias).view(batch, seq, -1, self.head_dim)
        qk, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        if self.q_norm is not None:
            normed = F.rms_norm(qk.float(), (self.head_dim,), None, self.q_norm.eps)  # rounded once, as RMSNorm
            qk = (normed * self.qk_norm_weight.float()).to(qk.dtype)
        q, k = self.rotary.rotate(qk.transpose(1, 2), positions).split([self.n_heads, self.n_kv_heads], dim=1)
        return q, k, v.transpose(1, 2)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training: causal (or document-causal) attention over x, whose tokens sit at `positions` (batch, seq;
        default 0..seq-1). With `kv_cache`: their keys/values are stored at `positions` and each query
        attends to the cached keys up to its own position. `key_mask` (batch, seq): the tokens other
        queries may attend to (Mixture-of-Depths: the tokens its block processes)."""
        batch, seq, _ = x.shape
        if self.qkv_weight is not None:
            q, k, v = self._fused_qkv(x, positions)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.reshape(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.reshape(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(q, k, positions=positions)
        mask, causal = None, True
        if kv_cache is not None:
            kv_cache.write(positions, k, v, key_mask)
            k, v = kv_cache.k, kv_cache.v
            mask, causal = kv_cache.mask(positions), False
        elif doc_ids is not None or key_mask is not None:
            mask, causal = training_mask(seq, x.device, doc_ids, key_mask), False
        dropout = self.dropout if self.training else 0.0
        if causal:  # plain causal attention: SDPA, or a faster form where there is one (ops.attention)
            y = causal_attention(q, k.to(q.dtype), v.to(q.dtype), dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))
