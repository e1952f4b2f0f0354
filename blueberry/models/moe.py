"""Mixture of Experts: top-k router, sorted dispatch, grouped expert matmuls, balancing losses.

Dispatch: the (token, slot) assignments are sorted by expert and written into a buffer of fixed size
R = round_up(tokens * k) + num_experts * align rows, where each expert's group starts at a multiple of
`align` and has a length that is a multiple of `align` (padding rows are zeros, their outputs carry zero
weight); the last group absorbs the remainder; `align` is the device's (ops.grouped_mm.group_alignment).
All experts then run in one `F.grouped_mm` (or a loop over the contiguous slices where grouped_mm is
not available: ops.grouped_mm). Why aligned groups: every shape in the step is static (torch.compile
keeps one graph, capacity dropping included), and on CPU the per-group bf16 matmuls see a small set of
shapes, so oneDNN reuses its compiled kernels instead of building one for every new routing count
(`python benchmarks/moe_layer.py` measures it).
Nothing loops over experts with a boolean mask over all tokens.

Losses (returned, weighted by the config):
  load balancing  N * sum_i f_i * P_i   f_i: fraction of assignments routed to expert i,
                                        P_i: mean router probability of expert i  (1.0 when uniform)
  router z-loss   mean(logsumexp(logits)^2)
Capacity: with capacity_factor c > 0, each expert takes at most ceil(c * tokens * k / N) assignments
during training, first come first served in token order; the rest pass through the residual only.
Evaluation and generation are dropless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.grouped_mm import expert_matmul, group_alignment
from .layers import UNGATED_ACTIVATIONS, SwiGLU


@dataclass
class MoEAux:
    loss: torch.Tensor  # weighted sum of the two losses below
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor  # (num_experts,) fraction of assignments per expert (before capacity)
    dropped_fraction: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class MixtureOfExperts(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 16, top_k: int = 2,
                 capacity_factor: float = 0.0, load_balancing_weight: float = 0.01,
                 z_loss_weight: float = 0.001, router_noise: float = 0.0, shared_expert: bool = False,
                 mlp_type: str = "swiglu", use_grouped_mm: bool = True, group_align: int | None = None):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k {top_k} exceeds num_experts {num_experts}")
        self.num_experts, self.top_k, self.d_ff = num_experts, top_k, d_ff
        self.capacity_factor = capacity_factor
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        self.router_noise = router_noise
        self.gated = mlp_type == "swiglu"
        self.ungated_act = None if self.gated else UNGATED_ACTIVATIONS[mlp_type]
        self.use_grouped_mm = use_grouped_mm
        self.expert_matmul = expert_matmul  # the product of the sorted rows and the expert stacks (swappable)
        self.group_align = group_align  # rows per alignment unit of an expert group; None: by device
        self.router = nn.Linear(d_model, num_experts, bias=False)
        # Expert weights stacked (E, out, in); for SwiGLU the gate rows come first, then the up rows.
        up_rows = 2 * d_ff if self.gated else d_ff
        self.w_up = nn.Parameter(torch.empty(num_experts, up_rows, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        nn.init.normal_(self.w_up, std=d_model ** -0.5)
        nn.init.normal_(self.w_down, std=d_ff ** -0.5)
        self.shared = SwiGLU(d_model, d_ff) if shared_expert else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_expert else None

    def route(self, x: torch.Tensor):
        """x (T, D) -> logits (T, E), probs (T, E), top-k weights (T, k) and indices (T, k), all in fp32
        whatever the autocast. With k > 1 the k weights are renormalised to sum to 1 (Mixtral); with k = 1
        the weight is the router probability itself (Switch Transformer), which is what lets the language
        -model loss reach the router: a weight renormalised to 1 has no gradient."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
            if self.training and self.router_noise > 0:
                logits = logits + torch.randn_like(logits) * self.router_noise
            probs = logits.softmax(dim=-1)
            top_w, top_i = probs.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, probs, top_w, top_i

    def capacity(self, num_tokens: int) -> int | None:
        if not (self.training and self.capacity_factor > 0):
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def dispatch(self, flat_expert: torch.Tensor, num_tokens: int, align: int):
        """Plan the aligned expert groups for the flattened (token, slot) choices `flat_expert`.

        Returns counts (E,) assignments per expert before capacity, kept_counts (E,) after it,
        group_sizes (E,) padded rows per expert (sum = R), slot_token (R,) the token each buffer row
        reads (num_tokens = the zero row) and slot_choice (R,) the flat choice whose weight scales the
        row (A = the zero weight)."""
        num_choices, device = flat_expert.numel(), flat_expert.device
        order = torch.argsort(flat_expert, stable=True)  # choices grouped by expert, token order kept
        # scatter_add rather than bincount: a fixed (E,) shape keeps torch.compile's graph whole
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        sorted_expert = flat_expert[order]
        rank = torch.arange(num_choices, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
        cap = self.capacity(num_tokens)
        kept_counts = counts if cap is None else counts.clamp(max=cap)
        rows = -(-num_choices // align) * align + self.num_experts * align
        group_sizes = (kept_counts + align - 1) // align * align
        group_sizes[-1] += rows - group_sizes.sum()  # the last group takes the spare rows (zeros)
        dest = (torch.cumsum(group_sizes, 0) - group_sizes)[sorted_expert] + rank
        if cap is not None:
            dest = torch.where(rank < cap, dest, rows)  # dropped choices land in a discarded row
        slot_token = torch.full((rows + 1,), num_tokens, dtype=torch.long, device=device)
        slot_token = slot_token.scatter(0, dest, order // self.top_k)[:rows]
        slot_choice = torch.full((rows + 1,), num_choices, dtype=torch.long, device=device)
        slot_choice = slot_choice.scatter(0, dest, order)[:rows]
        return counts, kept_counts, group_sizes, slot_token, slot_choice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        num_tokens = x.shape[0]
        logits, probs, top_w, top_i = self.route(x)
        flat_expert = top_i.reshape(-1)
        dtype = _compute_dtype(x)
        if self.decoding(num_tokens):
            # compiled: fixed shapes (gather the chosen experts); eager: index them, no copies
            decode = self._gathered if torch.compiler.is_compiling() else self._looped
            out, counts, kept_counts = decode(x.to(dtype), top_w, top_i), None, None
        else:
            out, counts, kept_counts = self._dispatched(x, top_w, flat_expert, dtype)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.reshape(shape), self._aux(logits, probs, flat_expert, counts, kept_counts)

    def decoding(self, num_tokens: int) -> bool:
        """Few tokens and no gradients (generation): each token reads its own k experts' weights, with no
        dispatch, padding or capacity — the cost of decoding is then the weights it touches. Not where an
        instance's `run_experts` replaces the method: its experts are elsewhere, every token goes through it."""
        if "run_experts" in self.__dict__:
            return False
        return not self.training and not torch.is_grad_enabled() and num_tokens * self.top_k <= 2 * self.num_experts

    def _dispatched(self, x, top_w, flat_expert, dtype):
        """Sorted dispatch into aligned expert groups and grouped matmuls (training, evaluation, prefill)."""
        num_tokens, d = x.shape
        counts, kept_counts, group_sizes, slot_token, slot_choice = self.dispatch(
            flat_expert, num_tokens, self.group_align or group_alignment(x.device, dtype))
        x_padded = torch.cat([x.to(dtype), x.new_zeros(1, d, dtype=dtype)])
        h = self.run_experts(x_padded[slot_token], group_sizes, dtype)
        weights = torch.cat([top_w.reshape(-1), top_w.new_zeros(1)])[slot_choice]
        h = h * weights.unsqueeze(-1).to(h.dtype)
        out = torch.zeros(num_tokens + 1, d, device=x.device, dtype=h.dtype)
        return out.index_add_(0, slot_token, h)[:num_tokens], counts, kept_counts

    def run_experts(self, rows: torch.Tensor, group_sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The experts' MLPs on `rows` grouped by expert (`group_sizes` rows each, in expert order); an
        instance attribute of this name replaces it (training.expert_parallel runs them on other ranks)."""
        h = self.expert_matmul(rows, self.expert_weight("w_up", dtype), group_sizes, self.use_grouped_mm)
        h = self._activation(h)
        return self.expert_matmul(h, self.expert_weight("w_down", dtype), group_sizes, self.use_grouped_mm)

    def _gathered(self, x, top_w, top_i):
        """out[t] = sum_k w[t,k] * expert_{i[t,k]}(x[t]), with the chosen experts' weights gathered."""
        h = torch.einsum("td,tkfd->tkf", x, self.expert_weight("w_up", x.dtype, top_i))
        h = self._activation(h)
        h = torch.einsum("tkf,tkdf->tkd", h, self.expert_weight("w_down", x.dtype, top_i))
        return (h * top_w.unsqueeze(-1).to(h.dtype)).sum(dim=1)

    def _looped(self, x, top_w, top_i):
        """The same sum, one matmul pair per distinct expert chosen (one host sync for the choices)."""
        out = torch.zeros_like(x)
        chosen = top_i.tolist()
        for e in sorted({e for row in chosen for e in row}):
            tokens, slots = (top_i == e).nonzero(as_tuple=True)
            h = self._activation(self._expert_linear("w_up", e, x[tokens]))
            h = self._expert_linear("w_down", e, h)
            out.index_add_(0, tokens, h * top_w[tokens, slots].unsqueeze(-1).to(h.dtype))
        return out

    def _expert_linear(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x @ W_e.T for one expert; int8 weights on CPU go through PyTorch's int8-weight kernel."""
        scale = getattr(self, name + "_scale", None)
        weight = getattr(self, name)[expert]
        if scale is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), weight, scale[expert].to(torch.bfloat16))
            return y.to(x.dtype)
        return x @ self.expert_weight(name, x.dtype, expert).t()

    def _activation(self, h):
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return self.ungated_act(h)

    def expert_weight(self, name: str, dtype: torch.dtype, index: torch.Tensor | int | None = None) -> torch.Tensor:
        """`w_up`/`w_down` in `dtype` (the experts at `index` only, when given). A quantized model stores
        int8 weights with per-expert, per-output-row scales `<name>_scale` (ops/quantize.py)."""
        weight = getattr(self, name)
        scale = getattr(self, name + "_scale", None)
        if index is not None:
            weight = weight[index]
            scale = scale[index] if scale is not None else None
        weight = weight.to(dtype)
        return weight * scale.unsqueeze(-1).to(dtype) if scale is not None else weight

    def _aux(self, logits, probs, flat_expert, counts, kept_counts) -> MoEAux:
        if counts is None:
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat_expert.device).scatter_add_(
                0, flat_expert, torch.ones_like(flat_expert))
            kept_counts = counts
        load = counts.float() / flat_expert.numel()
        if not torch.is_grad_enabled() and not self.training:  # inference: no losses to weigh
            zero = load.new_zeros(())
            return MoEAux(zero, zero, zero, load, zero)
        lb_loss = self.num_experts * (load.detach() * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return MoEAux(
            loss=self.load_balancing_weight * lb_loss + self.z_loss_weight * z_loss,
            load_balancing_loss=lb_loss.detach(), z_loss=z_loss.detach(), expert_load=load.detach(),
            dropped_fraction=1.0 - kept_counts.sum().float() / flat_expert.numel(),
        )

    def expert_parameters_per_expert(self) -> int:
        return (self.w_up.numel() + self.w_down.numel()) // self.num_experts
