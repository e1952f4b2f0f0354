"""Multi-scale retention (Sun et al., 2023, "Retentive Network"), in its three equivalent forms.

Per head h with a fixed decay gamma_h (from 1 - 1/32 to 1 - 1/4096, see `head_decays`):

    parallel   o = (Q K^T * D) V,   D[n, m] = gamma^(n-m) for m <= n, else 0   (training)
    recurrent  S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n                   (generation, O(1) per token)
    chunkwise  the chunked scan of `scan.py`: parallel inside a chunk, recurrent across chunks (prefill)

Q and K carry rotary position embeddings (the paper's xPos rotation without its length extrapolation
scale). Each head's output is normalised (RMSNorm over the head: it also removes the paper's per-row
scale normalisations, which change nothing after it), gated by SiLU(x W_g), and projected back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RMSNorm, RotaryEmbedding
from .scan import RESET, chunked_scan, document_resets, scan_step


class RetentionState:
    """The generation state of one retention layer: S (B, heads, head_dim, head_dim) in float32. A forward
    whose first position is 0 starts a row afresh; otherwise the tokens continue the row."""

    def __init__(self, state: torch.Tensor):
        self.state = state

    def rows(self, start: int, end: int, length: int | None = None) -> "RetentionState":
        """Rows start..end-1; `length` (the positions a KV cache would keep) does not apply to a state."""
        return type(self)(self.state[start:end])


def head_decays(n_heads: int) -> torch.Tensor:
    """log(gamma_h) per head: gamma from 1 - 1/32 to 1 - 1/4096 (the paper's range) spread evenly in the
    exponent over however many heads there are."""
    exponents = -5.0 - torch.arange(n_heads, dtype=torch.float64) * (7.0 / max(n_heads - 1, 1))
    return torch.log1p(-torch.pow(2.0, exponents)).float()


def parallel_retention(q, k, v, log_gamma, doc_ids=None):
    """q, k, v (B, H, L, d); log_gamma (H,). The training form: (Q K^T * D) V."""
    length = q.shape[2]
    pos = torch.arange(length, device=q.device, dtype=torch.float32)
    distance = pos[:, None] - pos[None, :]
    decay = (distance[None] * log_gamma[:, None, None]).exp().masked_fill(distance[None] < 0, 0.0)  # (H, L, L)
    decay = decay[None]
    if doc_ids is not None:
        decay = decay * (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    scores = (q @ k.transpose(-1, -2)) * decay.to(q.dtype)
    return scores @ v


class MultiScaleRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, head_dim: int | None = None,
                 rope_theta: float = 10000.0, chunk: int = 64, norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.head_dim, self.chunk = n_heads, head_dim or d_model // n_heads, chunk
        inner = n_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.head_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)
        self.register_buffer("log_gamma", head_decays(n_heads), persistent=False)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> RetentionState:
        return RetentionState(torch.zeros(batch, self.n_heads, self.head_dim, self.head_dim, device=device,
                                          dtype=torch.float32))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: RetentionState | None = None,
                positions: torch.Tensor | None = None, form: str | None = None) -> torch.Tensor:
        """Parallel form without a cache (training, evaluation); with one, the chunkwise form for a prompt
        and the recurrent form for a single token. `form` forces one ("parallel", "chunkwise", "recurrent":
        the tests compare them)."""
        batch, length, _ = x.shape
        split = lambda t: t.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = self.rotary(q, k, positions=positions)
        k = k * self.head_dim ** -0.5
        form = form or ("parallel" if cache is None else "recurrent" if length == 1 else "chunkwise")
        if form == "parallel":
            o = parallel_retention(q, k, v, self.log_gamma, doc_ids).transpose(1, 2)
        else:
            o = self._scan(q, k, v, doc_ids, cache, positions, recurrent=form == "recurrent")
        o = self.head_norm(o.to(x.dtype)).reshape(batch, length, -1)
        return self.o_proj(o * F.silu(self.g_proj(x)))

    def _scan(self, q, k, v, doc_ids, cache, positions, recurrent: bool) -> torch.Tensor:
        """Chunkwise or token-by-token; returns (B, L, H, d). Starts from (and updates) `cache`, if any."""
        batch, _, length, _ = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, d)
        log_a = self.log_gamma.expand(batch, length, self.n_heads)
        if doc_ids is not None:
            log_a = log_a.masked_fill(document_resets(doc_ids)[..., None], RESET)
        state = None
        if cache is not None:
            state = cache.state * (positions[:, 0] > 0)[:, None, None, None].float()
        if recurrent:
            state = state if state is not None else q.new_zeros(batch, self.n_heads, self.head_dim, self.head_dim,
                                                                 dtype=torch.float32)
            outs = []
            for t in range(length):
                # the scan's state is (value dim, key dim): h = v k^T, y = h q
                y, state = scan_step(v[:, t], log_a[:, t], k[:, t], q[:, t], state)
                outs.append(y)
            o = torch.stack(outs, dim=1)
        else:
            o, state = chunked_scan(v, log_a, k, q, self.chunk, state)
        if cache is not None:
            cache.state.copy_(state)
        return o
