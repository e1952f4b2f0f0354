"""The linear recurrence both state-space mixers (Mamba-2 and retention) are made of, in two forms.

Per head, with a state h of shape (P, N):

    h_t = a_t * h_{t-1} + x_t (outer) b_t          y_t = h_t c_t

where a_t = exp(log_a_t) is a scalar decay in (0, 1]. `chunked_scan` computes a whole sequence at once
(the "state-space duality" algorithm of Mamba-2): inside each chunk the output is a masked matrix
product, like attention with a decay mask; between chunks only the (P, N) states are carried. Its cost
is linear in the sequence length. `scan_step` advances the state by one token (generation).

A document boundary is a decay of zero: the caller puts `RESET` in log_a at the first token of a
document. Every sum of log-decays is a masked cumulative sum, never a difference of two, so a reset
(a large negative number) cannot cancel into a wrong decay.
"""

from __future__ import annotations

import torch

RESET = -1e4  # log-decay of a reset: exp(RESET) == 0 in float32, and it stays finite (no inf - inf)


def segment_sums(log_a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with [i, j] = sum of log_a[j+1 .. i] for j <= i and -inf above the diagonal."""
    T = log_a.shape[-1]
    expanded = log_a[..., :, None].expand(*log_a.shape, T)  # [i, j] = log_a[i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril(-1)
    sums = expanded.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def chunked_scan(x: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk: int,
                 initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H, P), log_a (B, L, H), b and c (B, L, H, N), initial_state (B, H, P, N) or None (zeros).
    Returns y (B, L, H, P) and the state after the last token, both in float32 (computed in float32
    whatever the autocast: decays are exponentials of sums)."""
    with torch.autocast(x.device.type, enabled=False):
        return _chunked_scan(x.float(), log_a.float(), b.float(), c.float(), chunk,
                             None if initial_state is None else initial_state.float())


def _chunked_scan(x, log_a, b, c, chunk, initial_state):
    batch, length, heads, p = x.shape
    n = b.shape[-1]
    pad = -length % chunk  # padded tokens: no input, decay 1: the state passes through unchanged
    if pad:
        x, b, c = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, b, c))
        log_a = torch.nn.functional.pad(log_a, (0, 0, 0, pad))
    chunks = (length + pad) // chunk
    x, b, c = (t.reshape(batch, chunks, chunk, heads, t.shape[-1]) for t in (x, b, c))
    log_a = log_a.reshape(batch, chunks, chunk, heads).permute(0, 3, 1, 2)  # (B, H, chunks, chunk)

    sums = segment_sums(log_a)  # [.., i, j]: decay from token j to token i of the same chunk
    # 1. within each chunk: y_i = sum_{j <= i} decay(j -> i) (c_i . b_j) x_j
    y_within = torch.einsum("bzihn,bzjhn,bhzij,bzjhp->bzihp", c, b, sums.exp(), x)
    # 2. the state each chunk adds, decayed to the chunk's end
    to_end = sums[..., -1, :].exp()  # (B, H, chunks, chunk): decay from token j to the chunk's last token
    added = torch.einsum("bzjhn,bhzj,bzjhp->bzhpn", b, to_end, x)
    # 3. carry the states across chunks (a short loop: one step per chunk)
    chunk_decay = sums[..., -1, 0].exp() * log_a[..., 0].exp()  # product of the chunk's decays (B, H, chunks)
    state = x.new_zeros(batch, heads, p, n) if initial_state is None else initial_state
    entering = []
    for z in range(chunks):
        entering.append(state)
        state = chunk_decay[:, :, z, None, None] * state + added[:, z]
    entering = torch.stack(entering, dim=1)  # (B, chunks, H, P, N): the state before each chunk
    # 4. what the carried-in state contributes to each token: decayed from the chunk's start
    from_start = log_a.cumsum(dim=-1).exp()  # (B, H, chunks, chunk)
    y_carried = torch.einsum("bzihn,bzhpn,bhzi->bzihp", c, entering, from_start)
    y = (y_within + y_carried).reshape(batch, chunks * chunk, heads, p)[:, :length]
    return y, state


def scan_step(x: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x (B, H, P), log_a (B, H), b and c (B, H, N), state (B, H, P, N) -> y (B, H, P), new state."""
    with torch.autocast(x.device.type, enabled=False):
        state = log_a.float().exp()[..., None, None] * state.float() + x.float()[..., None] * b.float()[:, :, None, :]
        return torch.einsum("bhpn,bhn->bhp", state, c.float()), state


def document_resets(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True at the first token of every document after the first of the row."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts
