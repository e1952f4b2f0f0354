"""The generation engine against independent references: the model's own uncached forward (recomputed
from scratch every token), each prompt generated alone, and transformers' generate() on the export."""

from __future__ import annotations

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.data.tokenizer import train_bpe
from blueberry.inference import ContextLengthError, Engine, SamplingParams
from blueberry.models import create_model

TEXT = ["the king speaks to the queen of night and day, love and war\n" * 3, "fire and wind, stone and river\n"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT * 20, 300)


def tiny_model(model_type="moe", seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, vocab_size=300, num_experts=4,
                device="cpu", use_fp8=False, model_type=model_type)
    cfg = AdaptiveMoEModelConfig(**{**base, **kw}).validate()
    model = create_model(cfg).eval()
    for p in model.parameters():  # larger weights: decisive argmaxes, varied tokens
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model


def uncached_greedy(model, prompt, n, eot=None):
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == eot:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def prompts(n, rng=None):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, 300, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("model_type", ["moe", "standard"])
def test_cached_batched_greedy_equals_uncached_reference(tok, model_type):
    model = tiny_model(model_type, n_kv_heads=2)
    engine = Engine(model, tok, slots=4)
    ps = prompts(6)  # more prompts than slots: later ones join as earlier ones leave
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eot=False)
    outs = engine.generate(ps, params)
    for p, seq in zip(ps, outs):
        assert seq.output_ids == uncached_greedy(model, p, 20)
        assert seq.finish_reason == "length"


def test_batched_sampling_equals_each_prompt_alone(tok):
    model = tiny_model("moe")
    ps = prompts(5)
    params = [SamplingParams(max_new_tokens=15, temperature=1.0, top_k=40, top_p=0.9, seed=i, stop_at_eot=False)
              for i in range(5)]
    together = [s.output_ids for s in Engine(model, tok, slots=8).generate(ps, params)]
    alone = [Engine(model, tok, slots=8).generate([p], [sp])[0].output_ids for p, sp in zip(ps, params)]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1


def test_context_is_enforced_not_cut(tok):
    engine = Engine(tiny_model(), tok, slots=2)
    with pytest.raises(ContextLengthError, match="context of 64"):
        engine.submit(list(range(1, 60)), SamplingParams(max_new_tokens=10))
    seq = engine.generate([list(range(1, 54))], SamplingParams(max_new_tokens=11, temperature=0, stop_at_eot=False))[0]
    assert len(seq.output_ids) == 11  # exactly up to the window


def test_stop_strings_and_end_of_text(tok):
    model = tiny_model("standard")
    engine = Engine(model, tok, slots=2)
    free = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eot=False))[0]
    text = tok.decode(free.output_ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    stopped = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=30, temperature=0, stop=(stop,),
                                                         stop_at_eot=False))[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.find(stop)]
    # end-of-text as the greedy choice: blocks that add nothing, and a head that scores only end-of-text
    eot_model = tiny_model("standard", tie_embeddings=False)
    with torch.no_grad():
        for block in eot_model.blocks:
            block.ffn.down.weight.zero_()
            block.attn.o_proj.weight.zero_()
        eot_model.lm_head.weight.zero_()
        eot_model.lm_head.weight[tok.eot_id] = torch.sign(eot_model.norm(eot_model.embed.weight[5]))
    first = Engine(eot_model, tok, slots=1).generate([[5]], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert first.finish_reason == "stop" and first.output_ids == []


def test_moe_decode_path_equals_dispatch_path():
    model = tiny_model("moe")
    moe = model.blocks[0].ffn
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert moe.decoding(3)
        fast, _ = moe(x)
    with torch.enable_grad():  # gradients on: the training-time dispatch
        slow, _ = moe(x)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)


def test_greedy_equals_transformers_generate_on_the_export(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from blueberry.export import export_hf

    model = tiny_model("moe")
    export_hf(model, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    for p in prompts(3):
        ours = Engine(model, tok, slots=2).generate([p], SamplingParams(max_new_tokens=16, temperature=0))[0]
        theirs = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16)[0, len(p):].tolist()
        if theirs and theirs[-1] == tok.eot_id:
            theirs = theirs[:-1]
        assert ours.output_ids == theirs


# ---------------------------------------------------------------- speculative decoding
def test_speculative_greedy_equals_the_targets_greedy(tok):
    from blueberry.inference.speculative import speculative_generate

    target, draft = tiny_model("moe", seed=0), tiny_model("standard", seed=1, n_layers=1)
    for p in prompts(4):
        params = SamplingParams(max_new_tokens=25, temperature=0, stop_at_eot=False)
        plain = Engine(target, tok, slots=1).generate([p], params)[0].output_ids
        spec = speculative_generate(target, draft, p, params, tok.eot_id, k=3)
        assert spec.output_ids == plain
        same = speculative_generate(target, target, p, params, tok.eot_id, k=3)
        assert same.output_ids == plain and same.acceptance_rate == 1.0  # a perfect draft


def test_speculative_sampling_follows_the_target_distribution():
    """The accept/correct rule, many times over fixed target and draft distributions on 6 tokens: the
    first token must follow p_0 exactly (chi-square), whatever the draft proposes."""
    from blueberry.inference.speculative import accept_or_correct

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 6, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, 6, generator=g) * 1.5, -1)
    n, counts, kept = 20000, torch.zeros(6), 0
    for _ in range(n):
        proposals = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out, accepted = accept_or_correct(p, q, proposals, g)
        counts[out[0]] += 1
        kept += accepted
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, expected)  # 5 degrees of freedom: p < 0.001
    assert 0 < kept < 2 * n


def test_draft_with_another_tokenizer_is_refused(tok):
    from blueberry.errors import UsageError
    from blueberry.inference.speculative import check_same_tokenizer

    other = train_bpe(["completely different text for another vocabulary"] * 30, 280)
    with pytest.raises(UsageError, match="different tokenizer"):
        check_same_tokenizer(tok, other)
    check_same_tokenizer(tok, tok)
