"""Basic building blocks: RMSNorm, rotary embeddings, the MLPs (the seed's `AdaptiveLinear`: components.py)."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.matmul import inference_linear


class RMSNorm(nn.RMSNorm):
    """PyTorch's RMSNorm, its weight in the input's dtype: under autocast a norm's input is the bf16/fp16
    output of a matmul, and a float32 weight beside it would leave the fused kernel for the composite one
    (PyTorch's "Mismatch dtype between input and weight" warning). The weight itself stays float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or for p = 0 an identity (no call at all for every token when decoding)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def stored_transposed(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix with its storage transposed: `result.t()` is contiguous. `F.linear` then
    multiplies by the contiguous (in, out) matrix, the order in which a matrix-vector product (one decoded
    token) reads the weights; CPU GEMM kernels are markedly faster that way at a few rows."""
    return weight.detach().t().contiguous().t()


class InferenceLinear(nn.Linear):
    """An `nn.Linear` prepared for decoding (`TransformerLM.fuse_projections`): the same parameters, its
    product by `ops.matmul.inference_linear` (the kernel for the weight's inference layout)."""

    @classmethod
    def of(cls, linear: nn.Linear) -> "InferenceLinear":
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)  # the same parameters, hooks and flags; no copy
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inference_linear(x, self.weight, self.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings in the "rotate half" layout (as Llama in Hugging Face transformers).

    cos/sin are computed once in fp32 and cast to the dtype of q/k at use: left in fp32 under autocast
    they would promote q and k, and with them the whole attention, to fp32.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None):
        """q, k: (batch, heads, seq, head_dim). Positions 0..seq-1, or `positions` (batch, seq)."""
        cos, sin = self._cos_sin(q.shape[-2], positions, q.dtype)
        return _rotated(q, cos, sin), _rotated(k, cos.to(k.dtype), sin.to(k.dtype))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor's heads (batch, heads, seq, head_dim) rotated: q and k stacked along the heads."""
        return _rotated(x, *self._cos_sin(x.shape[-2], positions, x.dtype))

    def _cos_sin(self, seq: int, positions: torch.Tensor | None, dtype: torch.dtype):
        if positions is None:
            if seq > self.cos.shape[0]:
                raise ValueError(f"sequence of {seq} positions exceeds max_seq_len {self.cos.shape[0]}")
            cos, sin = self.cos[:seq], self.sin[:seq]
        else:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (batch, 1, seq, dim)
        return cos.to(dtype), sin.to(dtype)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """ReLU(x)²: the ungated activation of the Primer paper and of modded-nanogpt's speedruns."""
    return F.relu(x).square()


UNGATED_ACTIVATIONS = {"silu": F.silu, "relu2": relu_squared}


class MLP(nn.Module):
    """Ungated feed-forward: Linear -> activation -> Linear (SiLU, the seed's; or ReLU²)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "silu"):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = dropout_layer(dropout)
        self.act = UNGATED_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x)), as in Llama."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = dropout_layer(dropout)

        self.gate_up_weight = None

    def fuse_projections(self, transposed: bool = False) -> None:
        """For inference: gate and up as one matrix (their weights become views of it; see attention)."""
        if self.gate_up_weight is not None or not (type(self.gate) is nn.Linear and type(self.up) is nn.Linear):
            return
        fused = torch.cat([self.gate.weight.detach(), self.up.weight.detach()])
        fused = stored_transposed(fused) if transposed else fused
        rows = self.gate.weight.shape[0]
        self.gate.weight = nn.Parameter(fused[:rows], requires_grad=False)
        self.up.weight = nn.Parameter(fused[rows:], requires_grad=False)
        self.gate_up_weight = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = inference_linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.dropout(self.down(F.silu(gate) * up))
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


def make_mlp(kind: str, d_model: int, d_ff: int, dropout: float = 0.0) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, dropout)
    return MLP(d_model, d_ff, dropout, activation=kind)
