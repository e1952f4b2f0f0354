"""The Mamba-2 mixer (Dao & Gu, 2024, "Transformers are SSMs"), written in plain PyTorch.

    in_proj -> z (gate), xBC, dt;  xBC -> causal depthwise conv -> SiLU -> x, B, C
    per head: h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t
    out_proj(RMSNorm(y * SiLU(z)))

Training runs the chunked scan of `scan.py` (linear in the sequence length); generation keeps a
constant-size state per sequence (`SSMState`: the last conv inputs and h), whatever the context. The
parameters follow the reference implementation: one group of B/C shared by all heads, A = -exp(A_log)
with A in [1, 16], dt = softplus(dt_raw + dt_bias) initialised log-uniform in [0.001, 0.1], D = 1.
With document masks, the state and the convolution restart at every document.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RMSNorm
from .scan import RESET, chunked_scan, document_resets, scan_step


class SSMState:
    """The generation state of one Mamba-2 layer for `batch` sequences: the last `width - 1` conv inputs
    (B, width - 1, channels) and h (B, heads, P, N). A forward whose first position is 0 starts a row
    afresh; otherwise the tokens must continue the row where it stopped (no rollback: the past is folded
    into h)."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv, self.ssm = conv, ssm

    def rows(self, start: int, end: int, length: int | None = None) -> "SSMState":
        """Rows start..end-1; `length` (the positions a KV cache would keep) does not apply to a state."""
        return type(self)(self.conv[start:end], self.ssm[start:end])


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, prefix: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution of x (B, L, C) with weight (C, 1, width): output t sees inputs t-width+1..t,
    the earlier ones taken from `prefix` (B, width - 1, C; zeros if None) and, with `doc_ids`, only those of
    token t's own document. Written as `width` shifted multiply-adds (a handful; it fuses when compiled)."""
    width = weight.shape[-1]
    if prefix is None:
        prefix = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    full = torch.cat([prefix.to(x.dtype), x], dim=1)
    length = x.shape[1]
    if doc_ids is not None:
        docs = torch.cat([doc_ids.new_full((doc_ids.shape[0], width - 1), -1), doc_ids], dim=1)
    out = bias.to(x.dtype).expand_as(x)
    for back in range(width):  # the input `back` tokens before t
        shifted = full[:, width - 1 - back: width - 1 - back + length]
        if doc_ids is not None:
            same = docs[:, width - 1 - back: width - 1 - back + length] == doc_ids
            shifted = shifted * same[..., None]
        out = out + shifted * weight[:, 0, width - 1 - back].to(x.dtype)
    return out


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, head_dim: int = 64, expand: int = 2, conv_width: int = 4,
                 chunk: int = 64, norm_eps: float = 1e-5):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"head_dim {head_dim} must divide the inner width {self.d_inner}")
        self.heads, self.head_dim, self.d_state, self.chunk = self.d_inner // head_dim, head_dim, d_state, chunk
        self.conv_channels = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_channels + self.heads, bias=False)
        self.conv = nn.Conv1d(self.conv_channels, self.conv_channels, conv_width, groups=self.conv_channels)
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = RMSNorm(self.d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """The parameters a generic N(0, std) init must not touch (the LM calls this after its own init)."""
        with torch.no_grad():
            self.conv.reset_parameters()
            self.A_log.copy_(torch.empty(self.heads).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.D.fill_(1.0)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> SSMState:
        width = self.conv.kernel_size[0]
        return SSMState(torch.zeros(batch, width - 1, self.conv_channels, device=device, dtype=dtype),
                        torch.zeros(batch, self.heads, self.head_dim, self.d_state, device=device,
                                    dtype=torch.float32))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: SSMState | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_channels, self.heads], dim=-1)
        prefix = initial = None
        if cache is not None:
            continuing = (positions[:, 0] > 0)  # a row at position 0 starts a new sequence
            prefix = cache.conv * continuing[:, None, None].to(cache.conv.dtype)
            initial = cache.ssm * continuing[:, None, None, None].float()
            width = self.conv.kernel_size[0]
            cache.conv.copy_(torch.cat([prefix.to(xbc.dtype), xbc], dim=1)[:, -(width - 1):].to(cache.conv.dtype))
        xbc = F.silu(causal_conv(xbc, self.conv.weight, self.conv.bias, prefix, doc_ids))
        xs, b, c = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H)
        log_a = dt * -torch.exp(self.A_log.float())
        if doc_ids is not None:
            log_a = log_a.masked_fill(document_resets(doc_ids)[..., None], RESET)
        xs = xs.reshape(batch, length, self.heads, self.head_dim)
        b = b[:, :, None, :].expand(batch, length, self.heads, self.d_state)
        c = c[:, :, None, :].expand(batch, length, self.heads, self.d_state)
        x_in = xs.float() * dt[..., None]
        if cache is not None and length == 1:
            y, state = scan_step(x_in[:, 0], log_a[:, 0], b[:, 0], c[:, 0], initial)
            y = y[:, None]
        else:
            y, state = chunked_scan(x_in, log_a, b, c, self.chunk, initial)
        if cache is not None:
            cache.ssm.copy_(state)
        y = y + self.D.float()[:, None] * xs.float()
        y = y.reshape(batch, length, self.d_inner).to(x.dtype)
        return self.out_proj(self.norm(y * F.silu(z)))
