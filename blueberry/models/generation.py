"""Sampling from logits (temperature, top-k, nucleus) and a convenience text-in, text-out helper."""

from __future__ import annotations

import torch


_MAX_INVERSE_TEMPERATURE = torch.finfo(torch.float32).max


def is_greedy(temperature: float) -> bool:
    """True for temperature 0, and for one so small that scaling the logits by it would overflow float32
    (its limit is the argmax anyway)."""
    return not temperature > 1.0 / _MAX_INVERSE_TEMPERATURE


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with nan as -inf and +inf as the largest float (argmax and softmax stay defined)."""
    logits = logits.float()
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=_MAX_INVERSE_TEMPERATURE, neginf=float("-inf"))


def sampling_log_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> torch.Tensor:
    """The log-probabilities `sample_next` draws from (rows, vocab), in float32, finite at one token at least
    in every row: temperature, then top-k (None, 0 or >= vocab: no cut-off), then nucleus top-p."""
    if is_greedy(temperature):
        best = clean_logits(logits).argmax(-1, keepdim=True)
        return torch.full_like(logits, float("-inf"), dtype=torch.float32).scatter(-1, best, 0.0)
    return torch.log_softmax(_scaled(logits, temperature, top_k, top_p), dim=-1)


def _scaled(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """float32 logits over the temperature, shifted to a maximum of 0 in every row, -inf where cut (the
    unnormalised log-probabilities); temperature > 0, not greedy."""
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)  # nan in a row makes its max nan, +inf inf, all -inf -inf
    inverse = 1.0 / temperature
    if inverse >= torch.finfo(torch.float32).tiny and bool(torch.isfinite(top).all()):
        # the usual case, in fewer passes: -inf entries stay -inf (times a positive float32), no nan arises
        scaled = (logits - top).mul_(inverse)
    else:
        logits = clean_logits(logits)
        empty = ~torch.isfinite(logits).any(-1, keepdim=True)  # nothing usable in the row: uniform
        logits = torch.where(empty, torch.zeros_like(logits), logits)
        shifted = logits - logits.amax(-1, keepdim=True)  # <= 0: scaling cannot overflow upwards
        scaled = torch.where(torch.isfinite(shifted), shifted * (1.0 / temperature), float("-inf"))
        scaled = torch.where(torch.isnan(scaled), float("-inf"), scaled)
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p (the first always)
        remove[:, 0] = False
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return scaled


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> next token ids (batch, 1). Safe for any temperature >= 0, top_k and top_p in
    (0, 1], and for rows holding nan or inf."""
    if is_greedy(temperature):
        return clean_logits(logits).argmax(dim=-1, keepdim=True)
    probs = sampling_log_probs(logits, temperature, top_k, top_p).exp()
    return _race(probs, torch.empty_like(probs).exponential_(generator=generator))[:, None]


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generators: list[torch.Generator]) -> torch.Tensor:
    """Next token of each row of `logits` (rows,), all with the same parameters (temperature > 0), row r
    drawn with `generators[r]` alone, so a row's draw does not depend on its neighbours: the rows'
    distributions computed together, then one uniform number per row from its own generator, looked up in
    the row's cumulative distribution (inverse-CDF sampling: one random number per row where the
    exponential race of `sample_next` needs one per token)."""
    weights = _scaled(logits, temperature, top_k, top_p).exp()  # unnormalised, at most 1
    uniform = torch.cat([torch.rand(1, generator=g, device=weights.device, dtype=torch.float64) for g in generators])
    return _inverse_cdf(weights.double(), uniform)  # float64 sums: no token rounded away


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row the first token whose cumulative weight exceeds uniform * the row's total: token i with
    probability w_i / sum(w), never a token the sum does not grow by (probability 0)."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    tokens = torch.searchsorted(cdf, (uniform[:, None] * total).contiguous(), right=True)
    last = torch.searchsorted(cdf, total)  # the first token where the sum reaches its total: the last drawable
    return torch.minimum(tokens, last)[:, 0]  # uniform * total rounded up to the total picks that one


def _race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: argmax of p / E with E ~ Exp(1) independent per token picks token i with
    probability p_i exactly, in a few vectorised operations (torch.multinomial costs far more per row)."""
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
                  eos: int | None = None) -> str:
    """Encode `prompt`, sample, decode: the whole continuation as one string. The continuation stops at
    the model's context window (the prompt's last max_seq_len - 1 tokens are kept)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [eos if eos is not None else 0]
    window = model.config.max_seq_len
    ids = ids[-(window - 1):]
    max_new_tokens = min(max_new_tokens, window - len(ids))
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        new = [int(t) for t in model.generate(idx, max_new_tokens, temperature, top_k, top_p, eos,
                                              generator=gen)]
    finally:
        model.train(was_training)
    return tokenizer.decode(new)
