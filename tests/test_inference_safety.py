"""The engine and sampling at the edges: every accepted sampling value is numerically safe, one request's
failure fails only that request, stop strings cut at the earliest, top-k 0 means no cut-off, speculative
decoding serves every request that fits, and a strict chat template's refusal is a clean error."""

from __future__ import annotations

import math

import pytest
import torch

from blueberry.data.tokenizer import train_bpe
from blueberry.inference import ContextLengthError, Engine, SamplingParams
from blueberry.models.generation import sample_next
from test_inference import TEXT, prompts, tiny_model

TEMPERATURES = [5e-324, 1e-45, 1e-39, 1e-30, 1e-6, 0.5, 1.0, 5.0, 1e6, 1e300, math.inf]
TOP_KS = [None, 0, 1, 7, 50, 10_000]
TOP_PS = [None, 1e-9, 0.5, 0.999, 1.0]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT * 20, 300)


def edge_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 50, generator=g) * 4
    rows[1, 3] = float("nan")  # a broken value among good ones
    rows[2, 5] = float("inf")
    rows[3] = float("-inf")  # nothing usable at all
    rows[3, 9] = 2.0
    rows[4] = float("nan")
    rows[5] *= 1e30  # huge but finite
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_next_is_safe_at_every_edge_value(dtype):
    logits = edge_logits().to(dtype)
    g = torch.Generator().manual_seed(1)
    for t in TEMPERATURES:
        for k in TOP_KS:
            for p in TOP_PS:
                ids = sample_next(logits, t, k, p, g)
                assert ids.shape == (6, 1) and ids.dtype == torch.long
                assert bool(((ids >= 0) & (ids < 50)).all()), (t, k, p, ids.flatten())
                assert int(ids[3, 0]) == 9  # the one finite logit of its row
                if t <= 1e6:  # (an infinite temperature makes every finite-scored token as likely)
                    assert int(ids[2, 0]) == 5  # +inf: certain


def test_the_temperature_to_zero_limit_is_the_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 300, generator=g)
    best = logits.argmax(-1, keepdim=True)
    for t in (0, 1e-39, 1e-30, 1e-12, 1e-6):
        for k in (None, 0, 1, 5):
            for p in (None, 1e-9, 0.9):
                assert torch.equal(sample_next(logits, t, k, p, g), best), (t, k, p)
    assert torch.equal(sample_next(logits, 1.0, 1, None, g), best)  # top-k 1 is greedy at any temperature
    assert torch.equal(sample_next(logits, 1.0, None, 1e-9, g), best)  # so is a tiny nucleus


def test_top_k_zero_is_no_cut_off():
    from blueberry.inference.speculative import distribution

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    a = sample_next(logits, 1.0, 0, 0.9, torch.Generator().manual_seed(4))
    b = sample_next(logits, 1.0, None, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    for k in (0, None, 300, 10_000):
        q = distribution(logits, SamplingParams(temperature=0.7, top_k=k))
        torch.testing.assert_close(q, torch.softmax(logits / 0.7, -1))


@pytest.mark.parametrize("temperature", [1e45, 1e300, math.inf])
def test_a_huge_temperature_draws_only_tokens_that_are_there(temperature):
    """1/T is 0 in float32: every finite logit equally likely, never a -inf one (no nan, no token past the end)."""
    from blueberry.models.generation import sample_rows

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(5))
    logits[:, ::2] = float("-inf")  # finite and -inf only: the fast path's case
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    for tokens in (sample_rows(logits, temperature, None, None, gens), sample_next(logits, temperature)[:, 0]):
        assert ((tokens >= 0) & (tokens < 50)).all() and (tokens % 2 == 1).all(), tokens
    assert len(set(sample_rows(logits, temperature, None, None, gens).tolist())) > 5  # spread over the 25 left


@pytest.mark.parametrize("temperature,top_k", [(0.7, None), (1.3, 3)])
def test_sampled_rows_follow_the_softmax_each_by_its_own_generator(temperature, top_k):
    """The engine's draws (inverse-CDF, one uniform per row) against the float64 softmax of the scaled, cut logits:
    every frequency within 4.5 standard errors; a row's draw is the same beside any neighbour."""
    from blueberry.models.generation import sample_rows

    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(11)) * 2
    n = 20000
    draws = sample_rows(logits.expand(n, 12), temperature, top_k, None,
                        [torch.Generator().manual_seed(i) for i in range(n)])
    scaled = logits[0].double() / temperature
    if top_k:
        scaled[scaled < scaled.topk(top_k).values[-1]] = float("-inf")
    expected = torch.softmax(scaled, -1)
    observed = torch.bincount(draws, minlength=12).double() / n
    assert ((observed - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-12).all()
    other = torch.randn(1, 12)
    for seed in range(20):
        alone = sample_rows(logits, temperature, top_k, None, [torch.Generator().manual_seed(seed)])
        beside = sample_rows(torch.cat([other, logits]), temperature, top_k, None,
                             [torch.Generator().manual_seed(99), torch.Generator().manual_seed(seed)])
        assert int(alone[0]) == int(beside[1])


def test_a_request_whose_sampling_fails_fails_alone(tok, monkeypatch):
    import blueberry.inference.engine as engine_module

    model = tiny_model("moe")
    ps = prompts(4)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eot=False)
    alone = [Engine(model, tok, slots=4).generate([p], greedy)[0].output_ids for p in ps[:3]]
    real = engine_module.sample_rows

    def poisoned(logits, temperature, *args):
        if temperature == 0.123:
            raise RuntimeError("probability tensor contains inf")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "sample_rows", poisoned)
    engine = Engine(model, tok, slots=4)
    bad = SamplingParams(max_new_tokens=12, temperature=0.123, stop_at_eot=False)
    seqs = engine.generate(ps, [greedy, greedy, greedy, bad])
    assert [s.output_ids for s in seqs[:3]] == alone
    assert [s.finish_reason for s in seqs] == ["length"] * 3 + ["error"]
    assert seqs[3].error_kind == "request" and "inf" in seqs[3].error
    assert engine.stats()["active"] == 0 and engine.stats()["finished"] == {"length": 3, "error": 1}


def test_a_failing_text_listener_fails_only_its_request(tok):
    model = tiny_model("standard")
    ps = prompts(3)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eot=False)
    alone = Engine(model, tok, slots=3).generate(ps[:2], params)

    def broken(text):
        raise ConnectionError("the listener went away")

    engine = Engine(model, tok, slots=3)
    seqs = [engine.submit(ps[0], params), engine.submit(ps[1], params), engine.submit(ps[2], params, broken)]
    engine.run_until_done()
    assert [s.output_ids for s in seqs[:2]] == [s.output_ids for s in alone]
    assert seqs[2].finish_reason == "error" and seqs[2].error_kind == "internal"
    assert all(s.done.is_set() for s in seqs) and not engine.has_work()


def test_a_failed_shared_forward_fails_the_batch_then_the_engine_recovers(tok):
    from blueberry.inference.server import EngineLoop

    model = tiny_model("standard")
    engine = Engine(model, tok, slots=2)
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eot=False)
    expected = Engine(model, tok, slots=2).generate([prompts(1)[0]], params)[0].output_ids
    real, calls = engine._decode, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(*args)

    engine._decode = fails_once
    first = [engine.submit(p, params) for p in prompts(2)]  # both queued before the loop's first step
    loop = EngineLoop(engine)
    try:
        assert all(s.done.wait(30) for s in first)
        assert {s.finish_reason for s in first} == {"error"}
        again = loop.submit(prompts(1)[0], params)
        assert again.done.wait(30) and again.output_ids == expected
    finally:
        loop.stopping = True
        loop.wake.set()


def test_stop_strings_cut_at_the_earliest_whatever_their_order(tok):
    model = tiny_model("standard")
    engine = Engine(model, tok, slots=1)
    free = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eot=False))[0]
    text = free.text
    early = next(text[i:i + 2] for i in range(1, len(text) - 2) if text[i:i + 2].strip())
    late = next(text[i:i + 2] for i in range(len(text) - 2, 0, -1)
                if text[i:i + 2].strip() and text.find(text[i:i + 2]) > text.find(early))
    for stop in ((late, early), (early, late)):
        out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=30, temperature=0, stop=stop,
                                                         stop_at_eot=False))[0]
        assert out.finish_reason == "stop" and out.text == text[:text.find(early)], stop
    out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=30, temperature=0, stop=("",),
                                                     stop_at_eot=False))[0]
    assert out.text == text  # an empty stop string is no stop


def test_speculative_serves_every_request_that_fits_the_context(tok):
    from blueberry.inference.speculative import speculative_generate

    target, draft = tiny_model("moe", seed=0), tiny_model("standard", seed=1, n_layers=1)
    prompt = list(range(1, 55))  # 54 tokens + 10 new = the window of 64 exactly
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eot=False)
    plain = Engine(target, tok, slots=1).generate([prompt], params)[0].output_ids
    for k in (1, 4, 9, 20):
        assert speculative_generate(target, draft, prompt, params, tok.eot_id, k=k).output_ids == plain
    sampled = speculative_generate(target, draft, prompt, SamplingParams(max_new_tokens=10, temperature=1.0, seed=3,
                                                                        stop_at_eot=False), tok.eot_id, k=4)
    assert len(sampled.output_ids) == 10
    with pytest.raises(ContextLengthError):
        speculative_generate(target, draft, prompt + [1], params, tok.eot_id, k=4)


# ---------------------------------------------------------------- strict chat templates
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}{{ system }} {% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def strict_tok(tmp_path_factory):
    """A transformers tokenizer whose chat template raises on roles that do not alternate (as Llama 2's
    and Mistral's do)."""
    from transformers import PreTrainedTokenizerFast

    from blueberry.data.tokenizer import load_tokenizer

    base = train_bpe(["[INST] the king speaks [/INST] the queen answers\n" * 40] + TEXT * 10, 290)
    fast = PreTrainedTokenizerFast(tokenizer_object=base.hf, eos_token="<|endoftext|>")
    fast.chat_template = STRICT_TEMPLATE
    path = tmp_path_factory.mktemp("strict") / "tok"
    fast.save_pretrained(path)
    return load_tokenizer(str(path))


def test_a_strict_templates_refusal_is_a_chat_format_error(strict_tok):
    from blueberry.data.chat_template import ChatFormatError, chat_prompt_ids

    assert chat_prompt_ids([{"role": "user", "content": "hi"}], strict_tok)
    with pytest.raises(ChatFormatError, match="roles must alternate") as info:
        chat_prompt_ids([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}], strict_tok)
    assert "\n" not in str(info.value)


def test_chat_drops_whole_exchanges_under_a_strict_template(strict_tok):
    from blueberry.inference.chat import chat_loop

    model = tiny_model("standard", vocab_size=300)
    lines = iter(["the king speaks of the night and the day"] * 6 + ["word " * 80, "the queen"])
    written = []

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    rc = chat_loop(model, strict_tok, SamplingParams(max_new_tokens=6, temperature=0), system="be brief",
                   read=read, write=written.append)
    assert rc == 0
    out = "".join(written)
    assert "(oldest turns dropped to fit the model's context)" in out
    assert "does not fit the model's context" in out


def test_the_server_answers_a_strict_templates_refusal_with_400(strict_tok):
    from fastapi.testclient import TestClient

    from blueberry.inference.server import create_app

    app = create_app(Engine(tiny_model("standard", vocab_size=300), strict_tok, slots=2), "tiny")
    try:
        with TestClient(app, raise_server_exceptions=False) as http:
            bad = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "the king"}]
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": bad, "max_tokens": 3})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "messages" and "alternate" in r.json()["error"]["message"]
            good = [{"role": "user", "content": "the king"}]
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": good, "max_tokens": 3})
            assert r.status_code == 200, r.text
    finally:
        app.state.engine_loop.stopping = True


def test_failing_a_queued_request_ends_it_once_and_it_never_runs(tok):
    model = tiny_model("standard")
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eot=False)
    engine = Engine(model, tok, slots=1)
    ends = []
    running = engine.submit(prompts(1)[0], params)
    queued = engine.submit(prompts(1)[0], params, on_done=ends.append)
    engine.fail(queued, "refused")
    engine.run_until_done()
    assert running.finish_reason == "length"
    assert queued.finish_reason == "error" and queued.output_ids == [] and ends == [queued]
    assert engine.stats()["finished"] == {"length": 1, "error": 1}
