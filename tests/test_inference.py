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
def trained_tiny_run(corpus_dir, tmp_path_factory):
    from helpers import TINY_FLAGS, run_cli

    root = tmp_path_factory.mktemp("inference_run")
    r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / "run", "--max-steps", "20",
                "--eval-every", "20", "--no-compile", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    return root / "run"


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


# ---------------------------------------------------------------- quantization
def test_int8_linear_matches_a_float64_dequantised_reference():
    from blueberry.ops.quantize import Int8Linear

    lin = torch.nn.Linear(96, 80, bias=True)
    q = Int8Linear.from_linear(lin)
    w = lin.weight.detach().double()
    scale = w.abs().amax(1) / 127
    ref_w = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    x = torch.randn(3, 5, 96)
    # on CPU the int8 kernel takes bf16 activations and returns bf16: the reference rounds x the same way
    # and allows for the output's bf16 rounding (8 bits of mantissa)
    expected = x.bfloat16().double() @ ref_w.t() + lin.bias.double()
    torch.testing.assert_close(q(x).double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().mean().item())
    assert (ref_w - w).abs().max() <= scale.max() / 2 + 1e-12  # rounding error at most half a step


@pytest.mark.parametrize("model_type", ["moe", "standard"])
def test_int8_model_stays_close_and_keeps_generating(tok, model_type):
    from blueberry.ops.quantize import Int8Linear, quantize_model, weight_bytes

    model = tiny_model(model_type)
    reference = tiny_model(model_type)
    embedding = reference.embed.weight.numel() * 4  # a lookup table, kept in full precision
    before = weight_bytes(reference) + embedding  # the tied head is untied by quantization: count it twice
    quantize_model(model, "int8")
    assert weight_bytes(model) - embedding < 0.3 * (before - embedding)  # int8 + one scale per row
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    if model_type == "moe":
        assert model.blocks[0].ffn.w_up.dtype == torch.int8
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        a, b = model(idx).logits, reference(idx).logits
    # mean error: a token whose routing flips with the rounding may differ more on its own
    assert (a - b).abs().mean() < 0.1 * b.abs().mean()  # random weights amplify; trained: the bpb test below
    out = Engine(model, tok, slots=2).generate(prompts(2), SamplingParams(max_new_tokens=8, temperature=0,
                                                                          stop_at_eot=False))
    assert all(len(s.output_ids) == 8 for s in out)


def test_quantize_command_writes_a_run_that_loads_everywhere(trained_tiny_run, tmp_path):
    from helpers import run_cli

    out = tmp_path / "q8"
    r = run_cli("quantize", trained_tiny_run, out, "--eval-batches", "4")
    assert r.returncode == 0, r.stderr
    report = __import__("json").loads((out / "quantization.json").read_text())
    assert abs(report["bits_per_byte_change_percent"]) < 1.0  # the goal: int8 within 1%
    assert report["weight_bytes_after"] < 0.5 * report["weight_bytes_before"]
    g = run_cli("generate", "--checkpoint", out, "--prompt", "the", "--max-new-tokens", "5")
    assert g.returncode == 0, g.stderr
    e = run_cli("eval", "--checkpoint", out, "--batches", "2")
    assert e.returncode == 0 and "bits_per_byte" in e.stdout
    x = run_cli("export", out, tmp_path / "hf")
    assert x.returncode == 2 and "quantized run" in x.stderr
    int4 = run_cli("quantize", trained_tiny_run, tmp_path / "q4", "--method", "int4", "--device", "cpu")
    assert int4.returncode == 2 and "int4 needs a CUDA GPU" in int4.stderr


# ---------------------------------------------------------------- the terminal chat
def test_chat_keeps_the_conversation_resets_and_quits(tok):
    from blueberry.inference.chat import chat_loop

    model = tiny_model("standard")
    lines = iter(["hello", "and then?", "/reset", "again"])
    seen_prompts, written = [], []

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    engine_submit = Engine.submit

    def spy(self, prompt_ids, params, on_text=None):
        seen_prompts.append(tok.decode(prompt_ids))
        return engine_submit(self, prompt_ids, params, on_text)

    Engine.submit = spy
    try:
        rc = chat_loop(model, tok, SamplingParams(max_new_tokens=6, temperature=0), read=read, write=written.append)
    finally:
        Engine.submit = engine_submit
    assert rc == 0
    assert seen_prompts[0].endswith("User: hello\nAssistant:")
    assert "User: hello\nAssistant:" in seen_prompts[1] and seen_prompts[1].endswith("User: and then?\nAssistant:")
    assert seen_prompts[2].startswith("User: again") and "hello" not in seen_prompts[2]  # /reset forgot it
    assert "(conversation cleared)\n" in written


@pytest.mark.parametrize("model_type,slots,buckets", [("standard", 4, True), ("moe", 4, False), ("moe", 6, True)])
def test_compiled_decode_equals_eager_and_transformers(tok, tmp_path, model_type, slots, buckets):
    """The compiled step (with the device's inductor options: on CPU frozen weights, C++ wrapper, C++ GEMM
    templates) and the eager one (attending over the reached positions only, weights stored by input
    rows): the same greedy tokens as transformers' generate() on the export, batched and alone. MoE with 6
    slots: more expert assignments than twice the experts, the dispatched path (a graph break at its
    per-expert counts) instead of the gathered one (the gathered one at its smaller row counts). With `buckets` (a server's 1, 2, ..., slots rows,
    compiled by `warm_up`): each step takes the smallest that holds its rows, and no request compiles."""
    import copy

    from torch._dynamo.utils import counters

    from blueberry.inference.engine import row_buckets

    from transformers import AutoModelForCausalLM

    from blueberry.export import export_hf

    model = tiny_model(model_type)
    export_hf(model, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    ps, params = prompts(3), SamplingParams(max_new_tokens=12, temperature=0)
    theirs = []
    for p in ps:
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12)[0, len(p):].tolist()
        theirs.append(out[:-1] if out and out[-1] == tok.eot_id else out)
    compiled = Engine(copy.deepcopy(model), tok, slots=slots, compile=True,
                      compile_rows=row_buckets(slots) if buckets else None)
    compiled.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    rows_used = []
    decode = compiled._decode
    compiled._decode = lambda tokens, *rest: rows_used.append(tokens.shape[0]) or decode(tokens, *rest)
    eager = Engine(copy.deepcopy(model), tok, slots=slots)
    for engine in (compiled, eager):
        assert [s.output_ids for s in engine.generate(ps, params)] == theirs
        assert [engine.generate([p], params)[0].output_ids for p in ps] == theirs
    assert compiled.compile_failure is None
    assert counters["stats"]["unique_graphs"] == graphs  # warm_up compiled every row count
    assert ({1, 4} <= set(rows_used) <= {1, 2, 4}) if buckets else set(rows_used) == {slots}  # 3 prompts: 4 rows


@pytest.mark.parametrize("kw,together", [({"model_type": "moe"}, True), ({"model_type": "standard"}, True),
                                         ({"model_type": "standard", "layers": "mamba:mlp,attn:mlp"}, False),
                                         ({"model_type": "standard", "layers": "attn:mlp,mod(attn:mlp)"}, False)])
def test_requests_arriving_together_are_prefilled_in_one_forward(tok, kw, together):
    """Prompts of several lengths admitted at one step: one padded prefill forward where the model allows
    (attention), one per request where padding would reach a state or the routing (Mamba-2,
    Mixture-of-Depths); the tokens are those of each prompt generated alone."""
    model = tiny_model(**kw)
    ps, params = prompts(4), SamplingParams(max_new_tokens=6, temperature=0)
    alone = [Engine(model, tok, slots=4).generate([p], params)[0].output_ids for p in ps]
    engine = Engine(model, tok, slots=4)
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    try:
        seqs = [engine.submit(p, params) for p in ps]
        engine.step()
    finally:
        handle.remove()
    prefills = [shape for shape in calls if shape[1] > 1 or shape[0] != 4]
    assert len(prefills) == (1 if together else 4)
    engine.run_until_done()
    assert [s.output_ids for s in seqs] == alone
