"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Each round (one sequence): the draft samples k tokens one by one; the target scores the pending token
and the k proposals at once (k + 1 positions of its static cache); proposal i is kept with probability
min(1, p_i / q_i) (p: target, q: draft, both the distributions actually sampled from, i.e. after
temperature, top-k and top-p); at the first rejection a token is drawn from the residual
max(0, p - q) renormalised, and after k acceptances a bonus token from the target. The output then
follows the target's distribution exactly (Leviathan et al., 2023); greedy (temperature 0) keeps the
target's argmax, so it equals the target's own greedy output token for token. Rejected positions are
simply written over in the next round: the caches need no copying back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..models.generation import sampling_log_probs
from .engine import ContextLengthError, SamplingParams


@dataclass
class SpeculativeResult:
    output_ids: list[int]
    proposed: int  # draft tokens proposed
    accepted: int  # of them accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    if target_tokenizer.content_id != draft_tokenizer.content_id:  # the content, wherever it was read from
        raise UsageError("--draft was trained with a different tokenizer than the target "
                         f"({draft_tokenizer.identity} vs {target_tokenizer.identity}); a draft must share the "
                         "target's tokenizer (train it on the same --dataset, or with --tokenizer)")


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample_next` draws from: (rows, vocab) probabilities in float32 (one-hot when
    greedy); the same filtering, so top_k 0 is no cut-off and any accepted temperature is safe."""
    return sampling_log_probs(logits, params.temperature, params.top_k, params.top_p).exp()


def accept_or_correct(p: torch.Tensor, q: torch.Tensor, proposals: list[int], generator) -> tuple[list[int], int]:
    """p (k + 1, V) target distributions, q (k, V) draft distributions of `proposals`.
    Returns the tokens to append (accepted proposals, then a correction or bonus token) and the number
    of proposals accepted."""
    out = []
    for i, token in enumerate(proposals):
        ratio = p[i, token] / q[i, token].clamp(min=1e-20)
        if torch.rand((), generator=generator, device=p.device) < ratio:
            out.append(token)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out, i
    out.append(int(torch.multinomial(p[len(proposals)], 1, generator=generator)))
    return out, len(proposals)


@torch.no_grad()
def speculative_generate(target, draft, prompt_ids: list[int], params: SamplingParams, eot_id: int,
                         k: int = 4) -> SpeculativeResult:
    for role, model in (("target", target), ("draft", draft)):
        if any(m.config.stateful for m in getattr(model, "members", [model])):  # an ensemble: every member
            raise UsageError(f"the {role} has Mamba-2 or retention layers: their recurrent state cannot roll back "
                             "the draft tokens the target rejects; speculative decoding needs attention-only models")
    device = next(target.parameters()).device
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    # the last round proposes at most max_new_tokens - 1 - len(out) tokens: no position passes the window
    if len(prompt_ids) + params.max_new_tokens > context:
        raise ContextLengthError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                                 f"({params.max_new_tokens}) exceeds the context of {context}")
    generator = torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else 0)
    t_caches, d_caches = target.new_kv_caches(1), draft.new_kv_caches(1)

    def run(model, caches, tokens, start):
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        return model(ids, kv_caches=caches, positions=positions).logits[0]

    # prefill: both models see the prompt but its last token, which is the first pending token
    if len(prompt_ids) > 1:
        run(target, t_caches, prompt_ids[:-1], 0)
        run(draft, d_caches, prompt_ids[:-1], 0)
    seq, out = list(prompt_ids), []
    draft_fed = len(prompt_ids) - 1  # positions the draft's cache holds
    proposed = accepted = 0
    while len(out) < params.max_new_tokens:
        n = len(seq)  # seq[-1] is pending at position n - 1
        steps = min(k, params.max_new_tokens - len(out) - 1)
        proposals, q_rows = [], []
        feed = seq[draft_fed:]
        for _ in range(steps):
            q = distribution(run(draft, d_caches, feed, n - len(feed))[-1:], params)
            token = int(torch.multinomial(q[0], 1, generator=generator))
            proposals.append(token)
            q_rows.append(q[0])
            feed, n = [token], n + 1
        n = len(seq)
        p = distribution(run(target, t_caches, [seq[-1]] + proposals, n - 1), params)
        new, kept = accept_or_correct(p, torch.stack(q_rows) if q_rows else p[:0], proposals, generator)
        proposed, accepted = proposed + len(proposals), accepted + kept
        if proposals:  # the draft holds the accepted proposals it was fed (all but its last one)
            draft_fed = n + min(kept, len(proposals) - 1)
        for token in new:
            if params.stop_at_eot and token == eot_id:
                return SpeculativeResult(out, proposed, accepted)
            out.append(token)
            seq.append(token)
            if len(out) >= params.max_new_tokens:
                break
    return SpeculativeResult(out, proposed, accepted)
