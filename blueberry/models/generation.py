"""Sampling from logits (temperature, top-k, nucleus) and a convenience text-in, text-out helper."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> next token ids (batch, 1)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


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
