"""MoE layer forward+backward: Blueberry (sorted dispatch into aligned groups + grouped_mm) vs the same
without group alignment (align 1: every routing gives new matmul shapes) vs a boolean-mask loop over
experts (the seed's original approach) vs Hugging Face's MixtralSparseMoeBlock, same shapes and weights.
Every step draws fresh inputs, so the routing (and the tokens per expert) changes as in training.

    python benchmarks/moe_layer.py [--tokens 4096] [--d-model 256] [--d-ff 512] [--experts 8] [--top-k 2]

Runs alternate (A, B, C, A, B, C, ...); the table shows median ms and each ratio against Blueberry.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from common import table, timed

from blueberry.models import MixtureOfExperts


class MaskLoopMoE(torch.nn.Module):
    """Baseline: for each expert, a boolean mask over all tokens, then index and scatter."""

    def __init__(self, moe: MixtureOfExperts):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        m = self.moe
        x2 = x.reshape(-1, x.shape[-1])
        _, _, top_w, top_i = m.route(x2)
        out = torch.zeros_like(x2)
        for e in range(m.num_experts):
            mask = (top_i == e)
            rows = mask.any(-1)
            if not rows.any():
                continue
            w = (top_w * mask).sum(-1)[rows].unsqueeze(-1)
            h = x2[rows] @ m.w_up[e].t()
            gate, up = h.chunk(2, dim=-1)
            out[rows] += w * ((F.silu(gate) * up) @ m.w_down[e].t())
        return out.reshape(x.shape)


def hf_block(moe: MixtureOfExperts, d_model: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d_model, intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                        num_experts_per_tok=moe.top_k)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.w_up)
        block.experts.down_proj.copy_(moe.w_down)
    return block


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    moe = MixtureOfExperts(args.d_model, args.d_ff, args.experts, args.top_k).to(device)
    unaligned = MixtureOfExperts(args.d_model, args.d_ff, args.experts, args.top_k, group_align=1).to(device)
    unaligned.load_state_dict(moe.state_dict())
    variants = {"blueberry (grouped_mm)": moe, "blueberry, unaligned groups": unaligned,
                "boolean-mask loop": MaskLoopMoE(moe).to(device),
                "HF MixtralSparseMoeBlock": hf_block(moe, args.d_model).to(device)}

    def step(module, amp):
        xx = torch.randn(args.tokens // 256, 256, args.d_model, device=device, requires_grad=True)
        with torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            out = module(xx)
            out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()

    rows = []
    for amp in (False, True):
        times = {name: [] for name in variants}
        for _ in range(args.repeats):  # alternate the variants
            for name, module in variants.items():
                times[name].append(timed(lambda: step(module, amp), warmup=1, repeats=1))
        med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        base = med["blueberry (grouped_mm)"]
        for name, t in med.items():
            rows.append([("bf16 autocast" if amp else "fp32"), name, f"{t * 1e3:.1f}", f"{t / base:.2f}x"])
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, d_model {args.d_model}, d_ff {args.d_ff}, "
          f"{args.experts} experts, top-{args.top_k}, device {device}, {torch.get_num_threads()} threads")
    print(table(["precision", "implementation", "ms", "time vs blueberry"], rows))


if __name__ == "__main__":
    main()
