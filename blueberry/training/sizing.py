"""The sizing rule: how large a model and how many training tokens a run gets, from the unique tokens of its
data and the compute its budget buys. The rule and its constants live here, with their sources.

    compute C       = measured training FLOP/s x the seconds left for training
    tokens D(N)     = min(TOKENS_PER_PARAM x N, MAX_EPOCHS x unique tokens)
    a model fits    when flops_per_token(N) x D(N) <= C   (the budget trains it on D(N) tokens)
                    and N <= D(N) / MIN_TOKENS_PER_PARAM   (not more parameters than training tokens)
    the choice      the largest model of the shape family that fits; the smallest when none does

Where the corpus is large, the first bound decides: D = 20 N, Chinchilla's compute-optimal split. Where it
is small, repeating it pays for a few passes only, so the tokens stop at MAX_EPOCHS passes and the
parameters at about one per training token: a larger model for a few passes rather than a tiny model for
many, or a large one that memorises. N counts the non-embedding parameters (Kaplan et al.'s convention:
the embedding's rows are a lookup, not compute); every parameter of an MoE's experts counts towards N.

The shape family is nanochat's: `d_model = 64 x depth`, heads of 64, so one number (the depth) names a size.
"""

from __future__ import annotations

from dataclasses import dataclass

# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models": about 20 tokens per parameter.
TOKENS_PER_PARAM = 20.0
# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models": up to ~4 epochs of repeated data are
# worth about as much as unique data, after which returns fall off. This machine measured its optimum
# earlier, and that is the constant: the CPU recipe search's best single model trains 2.9 passes over the
# 30 training plays (900 steps of 4,096 tokens over 1.26M tokens; 700 steps (2.3 passes) and 1,000 (3.2)
# scored worse; docs/LOG.md, #20 rounds three to seven).
MAX_EPOCHS = 2.9
# The recipe search's best model, d_model 256 x 4 blocks (3.2M non-embedding parameters, 3.7M training
# tokens), sits at about one training token per parameter; wider models at equal wall time scored worse
# (d320 x 4: 1.8537 against 1.8317; docs/LOG.md, #20). The next size of the family (6.4M) would have fewer
# training tokens than parameters at these passes.
MIN_TOKENS_PER_PARAM = 1.0
# The shape family's aspect ratio (nanochat: model_dim = depth x 64) and head size.
WIDTH_PER_LAYER = 64
HEAD_DIM = 64
MAX_DEPTH = 48


@dataclass(frozen=True)
class Candidate:
    """One size of the family: its depth, parameters without the embedding, and training FLOPs per token."""
    depth: int
    params: int
    flops_per_token: float


@dataclass(frozen=True)
class SizeChoice:
    depth: int
    params: int
    tokens: int
    regime: str  # "compute-optimal", "data-limited" or "compute-limited"
    why: str


def shape_for_depth(depth: int) -> dict:
    """The model fields of the family's member of this depth."""
    d_model = WIDTH_PER_LAYER * depth
    heads = max(1, d_model // HEAD_DIM)
    return dict(n_layers=depth, d_model=d_model, n_heads=heads, n_kv_heads=heads)


def tokens_for(params: int, unique_tokens: int) -> int:
    """D(N): the training tokens a model of `params` non-embedding parameters gets by the rule."""
    return int(min(TOKENS_PER_PARAM * params, MAX_EPOCHS * unique_tokens))


def fits(c: Candidate, compute: float, unique_tokens: int) -> bool:
    tokens = tokens_for(c.params, unique_tokens)
    return c.flops_per_token * tokens <= compute and c.params <= tokens / MIN_TOKENS_PER_PARAM


def choose_size(candidates: list[Candidate], compute: float, unique_tokens: int) -> SizeChoice:
    """The largest candidate that fits (`fits`), with its tokens and the reason, in words."""
    ordered = sorted(candidates, key=lambda c: c.params)
    fitting = [c for c in ordered if fits(c, compute, unique_tokens)]
    if not fitting:
        c = ordered[0]
        tokens = int(min(compute / c.flops_per_token, tokens_for(c.params, unique_tokens)))
        return SizeChoice(c.depth, c.params, tokens, "compute-limited",
                          f"even the smallest size cannot train its {tokens_for(c.params, unique_tokens):,} tokens "
                          "in the budget: it trains what the budget buys")
    c = fitting[-1]
    tokens = tokens_for(c.params, unique_tokens)
    if tokens < TOKENS_PER_PARAM * c.params:
        return SizeChoice(c.depth, c.params, tokens, "data-limited",
                          f"{unique_tokens:,} unique tokens: {MAX_EPOCHS:g} passes at most (Muennighoff et al. "
                          f"2023) and about {MIN_TOKENS_PER_PARAM:g} token per parameter or more")
    return SizeChoice(c.depth, c.params, tokens, "compute-optimal",
                      f"{TOKENS_PER_PARAM:g} tokens per parameter (Hoffmann et al. 2022) in the compute of the budget")


def data_limited_depth(candidates: list[Candidate], unique_tokens: int) -> int:
    """The largest depth the data allows whatever the compute (the parameter bound alone)."""
    allowed = [c.depth for c in candidates
               if c.params <= tokens_for(c.params, unique_tokens) / MIN_TOKENS_PER_PARAM]
    return max(allowed) if allowed else min(c.depth for c in candidates)
