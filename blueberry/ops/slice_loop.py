"""The expert matmuls where no grouped GEMM serves: one matmul per expert over its contiguous rows."""

from __future__ import annotations

import torch


def slice_loop(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` sorted by expert; `weight` (E, out, in); `counts` (E,) rows per expert, read to the host."""
    outs = [xe @ we.t() for xe, we in zip(torch.split(x, counts.tolist()), weight.unbind(0))]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])
