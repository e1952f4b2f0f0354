"""FP8 training matmul with dynamic per-tensor scaling (the recipe of torchao's "tensorwise" float8).

Forward:   y  = x @ w.T          with x, w in e4m3
Backward:  dx = dy @ w           with dy in e5m2, w in e4m3
           dw = dy.T @ x         with dy in e5m2, x in e4m3
Each operand is scaled so that its absolute maximum lands on the format's largest finite value;
`torch._scaled_mm` multiplies in FP8 and applies the inverse scales, accumulating in higher precision.
`torch._scaled_mm` wants its first operand row-major and its second column-major, which the
`.t().contiguous().t()` idiom below provides.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_EPS = 1e-12

# Below this many multiply-adds per output row the casts cost more than FP8 saves.
MIN_FP8_DIM = 256


def fp8_shapes_qualify(in_features: int, out_features: int) -> bool:
    """`_scaled_mm` needs both dims to be multiples of 16; tiny layers do not repay the casts."""
    return (
        in_features % 16 == 0
        and out_features % 16 == 0
        and min(in_features, out_features) >= MIN_FP8_DIM
    )


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale `t` into `dtype`'s range; returns (fp8 tensor, inverse scale as fp32 scalar)."""
    amax = t.detach().abs().max().float().clamp(min=_EPS)
    scale = torch.finfo(dtype).max / amax
    t8 = (t.float() * scale).clamp(min=-torch.finfo(dtype).max, max=torch.finfo(dtype).max).to(dtype)
    return t8, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _scaled_matmul(a8, a_inv, b8, b_inv, out_dtype):
    return torch._scaled_mm(a8.contiguous(), _col_major(b8), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype):
        x8, x_inv = to_float8(x2d, E4M3)
        w8, w_inv = to_float8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.out_dtype = out_dtype
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        return _scaled_matmul(x8, x_inv, w8.t(), w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_float8(grad_out.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dy (N, out) @ w (out, in); w is stored row-major (out, in).
            grad_x = _scaled_matmul(g8, g_inv, w8, w_inv, ctx.out_dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # dy.T (out, N) @ x (N, in)
            grad_w = _scaled_matmul(g8.t(), g_inv, x8, x_inv, torch.float32).to(ctx.w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) computed in FP8; x may have any number of leading dims."""
    if out_dtype is None:
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    pad = (-x2d.shape[0]) % 16  # _scaled_mm needs the row count to be a multiple of 16 too
    if pad:
        x2d = torch.nn.functional.pad(x2d, (0, 0, 0, pad))
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Linear.apply(x2d, weight, out_dtype)
    if pad:
        y = y[: y.shape[0] - pad]
    y = y.reshape(*lead, weight.shape[0])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
