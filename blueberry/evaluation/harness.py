"""A Blueberry model for EleutherAI's lm-evaluation-harness: `--model blueberry --model_args checkpoint=RUN`.

lm-eval has no plugin mechanism, so the model is registered when this module is imported; the
`blueberry lm-eval ...` verb imports it and then hands every other argument to lm-eval's own command
line unchanged. From Python: `import blueberry.evaluation.harness` and then `lm_eval.simple_evaluate(
model="blueberry", model_args="checkpoint=RUN", tasks=[...])`.

Requests are encoded the way lm-eval's own `hf` backend does (context and continuation encoded
together and split, no beginning-of-sequence token except for an empty context, which gets the
tokenizer's `prefix_id`: bos when it has one, else end-of-text, lm-eval's `prefix_token_id`), so that
scores equal those of the `hf` backend on the exported model; log-likelihoods come from `scoring.score`
(batched), rolling ones from lm-eval's own rolling windows (`scoring.rolling_windows`, all windows of all
requests scored in one batched pass), generations from the engine (greedy unless the task asks otherwise, stopping at the task's `until` strings).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own backends, registered before ours)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..inference import Engine, SamplingParams
from .scoring import rolling_windows, score


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's ids
    are those the whole text has beyond the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        context_ids = [tokenizer.prefix_id]
    return context_ids, continuation_ids


@register_model("blueberry")
class BlueberryLM(LM):
    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str = 16,
                 max_gen_toks: int = 256, dtype: str = "fp32", **_ignored):
        super().__init__()
        import torch

        from ..runs.loading import load_model

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's own default is "cuda": on a machine without one, take what is here
        self.model, self.config, self.tokenizer, _ = load_model(checkpoint, device, dtypes[dtype])
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**{**args, **extra})

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *r.args) for r in requests]
        return score(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        window = self.config.model.max_seq_len
        per_request = [rolling_windows(self.tokenizer.encode(r.args[0]), self.tokenizer.prefix_id, window)
                       for r in requests]
        scores = iter(score(self.model, [w for windows in per_request for w in windows], self.batch_size))
        return [sum(next(scores)[0] for _ in windows) for windows in per_request]

    def generate_until(self, requests) -> list[str]:
        engine = Engine(self.model, self.tokenizer, slots=min(self.batch_size, 16))
        seqs = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tokenizer.encode(context) or [self.tokenizer.prefix_id]
            max_new = max(1, min(max_new, self.config.model.max_seq_len - 1))
            ids = ids[-(self.config.model.max_seq_len - max_new):]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            seqs.append(engine.submit(ids, SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                                          stop=tuple(until), seed=0)))
        engine.run_until_done()
        return [s.text for s in seqs]
