"""GGUF export: what llama.cpp reads back must be our weights, our vocabulary and our metadata; where
llama-cpp-python is installed, its greedy tokens and logits must be ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_FLAGS, run_cli

gguf = pytest.importorskip("gguf")

from blueberry.configs import AdaptiveMoEModelConfig  # noqa: E402
from blueberry.data.chat_template import PLAIN_JINJA  # noqa: E402
from blueberry.data.tokenizer import train_bpe  # noqa: E402
from blueberry.export import ExportError  # noqa: E402
from blueberry.export.gguf import export_gguf, gguf_architecture  # noqa: E402
from blueberry.models import create_model  # noqa: E402

MIXED_TEXT = ("the king's 12345 swords\n\n  rise  again!\tΚαλημέρα κόσμε, 你好世界 🍓🫐 "
              "naïve café "
              "\ufffd\ufffd broken \u00e9\u0301 The KING'LL end  \n")


def _flags(model_type: str) -> list[str]:
    flags = list(TINY_FLAGS)
    for flag, value in (("--model-type", model_type), ("--d-model", "64"), ("--seq-len", "64")):
        flags[flags.index(flag) + 1] = value
    return flags


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """A tiny trained dense run and a tiny trained MoE run (3 steps each): {kind: run directory}."""
    root = tmp_path_factory.mktemp("gguf_runs")
    out = {}
    for kind in ("standard", "moe"):
        r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / kind,
                    "--max-steps", "3", "--eval-every", "3", "--no-compile", *_flags(kind))
        assert r.returncode == 0, r.stderr[-3000:]
        out[kind] = root / kind
    return out


def _load(run):
    from blueberry.runs.loading import load_model

    model, config, tok, _ = load_model(run, "cpu", torch.float32)
    return model, tok


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order (the inverse of convert_hf_to_gguf's permute)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_weights(model, arch: str) -> dict[str, np.ndarray]:
    """Our state dict under the GGUF names, written out independently of the exporter's own table."""
    cfg, sd = model.config, {k: v.float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"],
           "output.weight": model.lm_head.weight.detach().numpy()}
    for i in range(cfg.n_layers):
        b, g = f"blocks.{i}.", f"blk.{i}."
        pairs = {"attn_norm": "attn_norm", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
                 "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "ffn_norm": "ffn_norm",
                 "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm", "ffn_gate": "ffn.gate",
                 "ffn_up": "ffn.up", "ffn_down": "ffn.down", "ffn_gate_inp": "ffn.router"}
        for theirs, ours in pairs.items():
            if b + ours + ".weight" in sd:
                out[g + theirs + ".weight"] = sd[b + ours + ".weight"]
        if b + "ffn.w_up" in sd:
            f = sd[b + "ffn.w_up"].shape[1] // 2
            out[g + "ffn_gate_exps.weight"] = sd[b + "ffn.w_up"][:, :f]
            out[g + "ffn_up_exps.weight"] = sd[b + "ffn.w_up"][:, f:]
            out[g + "ffn_down_exps.weight"] = sd[b + "ffn.w_down"]
    return out


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return reader, fields


def _dequantized(tensor) -> np.ndarray:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in tensor.shape])))


def _check_weights(reader, model, arch: str, gguf_type: str) -> None:
    cfg = model.config
    want = expected_weights(model, arch)
    got = {t.name: t for t in reader.tensors}
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for name, w in want.items():
        value = _dequantized(got[name])
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            value = _unpermute(value, cfg.n_heads if "attn_q" in name else (cfg.n_kv_heads or cfg.n_heads))
        assert value.shape == w.reshape(value.shape).shape, name
        w = w.reshape(value.shape)
        if got[name].tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(value, w), name
        elif got[name].tensor_type == gguf.GGMLQuantizationType.F16:  # f16, or q8_0's fallback for short rows
            assert gguf_type in ("f16", "q8_0") and np.allclose(value, w, rtol=2 ** -10, atol=1e-6), name
        elif got[name].tensor_type == gguf.GGMLQuantizationType.BF16:
            assert gguf_type == "bf16" and np.allclose(value, w, rtol=2 ** -8, atol=0), name
        else:
            assert gguf_type == "q8_0" and got[name].tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs((value - w).reshape(-1, 32))
            assert (err <= blocks / 127 + 1e-8).all(), name  # half a step of the block's scale, with margin


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
@pytest.mark.parametrize("kind", ["standard", "moe"])
def test_cli_gguf_reads_back(runs, tmp_path, kind, gguf_type):
    out = tmp_path / f"{kind}.gguf"
    r = run_cli("export", runs[kind], out, "--format", "gguf", "--gguf-type", gguf_type)
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok = _load(runs[kind])
    cfg = model.config
    arch = gguf_architecture(cfg)
    assert arch == ({"standard": "qwen3", "moe": "qwen3moe"}[kind] if cfg.qk_norm else "llama")
    reader, fields = _read(out)
    _check_weights(reader, model, arch, gguf_type)
    if gguf_type == "f32":  # llama.cpp's graph for the architecture, run in numpy on the file, gives our logits
        ids = [tok.prefix_id] + tok.encode(MIXED_TEXT)[:40]
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(gguf_reference_logits(reader, fields, arch, ids) - ours).max() <= 1e-4 * max(
            1.0, float(np.abs(ours).max()))
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == {"f32": 0, "q8_0": 7}[gguf_type]
    for key, value in {"block_count": cfg.n_layers, "context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
                       "attention.head_count": cfg.n_heads, "attention.head_count_kv": cfg.n_kv_heads or cfg.n_heads,
                       "rope.dimension_count": cfg.attention_head_dim, "vocab_size": cfg.vocab_size}.items():
        assert fields[f"{arch}.{key}"] == value, key
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    if kind == "moe":
        assert fields[f"{arch}.expert_count"] == cfg.num_experts
        assert fields[f"{arch}.expert_used_count"] == cfg.expert_top_k
        assert fields[f"{arch}.expert_feed_forward_length"] == cfg.expert_d_ff
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tok.prefix_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eot_id
    assert fields["tokenizer.chat_template"] == PLAIN_JINJA
    _check_vocab(fields, tok)


def _check_vocab(fields, tok) -> None:
    """A BPE rebuilt from the GGUF's tokens and merges alone splits as ours does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, types, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], fields[
        "tokenizer.ggml.merges"]
    assert len(tokens) == len(types) == tok.vocab_size
    assert tokens == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    control = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
    assert control == ["<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}  # the control tokens keep their ids when added below
    rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    rebuilt.add_special_tokens([AddedToken(t, special=True) for t in control])
    text = MIXED_TEXT + "<|endoftext|>" + MIXED_TEXT[::-1]
    assert rebuilt.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert rebuilt.decode(tok.encode(MIXED_TEXT)) == tok.decode(tok.encode(MIXED_TEXT))


MAPPED = [
    (dict(model_type="standard", qk_norm=False), "llama"),
    (dict(model_type="standard", qk_norm=False, n_kv_heads=2, tie_embeddings=False), "llama"),
    (dict(model_type="standard", qk_norm=True, n_kv_heads=1), "qwen3"),
    (dict(model_type="moe", qk_norm=False), "llama"),
    (dict(model_type="moe", qk_norm=True, n_kv_heads=2), "qwen3moe"),
    (dict(model_type="moe", qk_norm=False, expert_top_k=1, shared_expert=True, qkv_bias=True), "qwen2moe"),
]
REFUSED = [
    (dict(model_type="moe", qk_norm=True, expert_top_k=1), "expert_top_k=1 with qk_norm"),
    (dict(model_type="moe", qk_norm=False, expert_top_k=1), "expert_top_k=1: llama.cpp's llama and qwen3moe"),
    (dict(model_type="moe", qk_norm=False, shared_expert=True), "expert_top_k=2 with shared_expert"),
    (dict(model_type="moe", qk_norm=True, shared_expert=True, expert_top_k=1), "qk_norm with shared_expert"),
    (dict(model_type="standard", mlp_type="silu"), "mlp_type='silu'"),
    (dict(model_type="standard", layers="mamba:mlp"), "no llama.cpp equivalent"),
    (dict(model_type="standard", layers="attn:mlp,mod(attn:mlp)"), "no llama.cpp equivalent"),
    (dict(model_type="standard", qk_norm=False, qkv_bias=True), "qkv_bias"),
]


def _random_model(**kw):
    cfg = AdaptiveMoEModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=64, vocab_size=300,
                                 num_experts=4, device="cpu", use_fp8=False, **kw).validate()
    model = create_model(cfg).eval()
    for p in model.parameters():  # random, non-trivial weights everywhere (norm gains and biases too)
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(["the quick brown fox jumps over the lazy dog " * 20, MIXED_TEXT], 300)


@pytest.mark.parametrize("kw,arch", MAPPED)
def test_architectures_map_exactly(tmp_path, bpe, kw, arch):
    model = _random_model(**kw)
    assert gguf_architecture(model.config) == arch
    out = export_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    reader, fields = _read(out)
    assert fields["general.architecture"] == arch
    _check_weights(reader, model, arch, "f32")
    names = {t.name for t in reader.tensors}
    if arch == "qwen2moe":
        assert {f"blk.0.{part}.weight" for part in ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp",
                                                     "ffn_down_shexp")} <= names
    reference = gguf_reference_logits(reader, fields, arch, list(range(1, 40)))
    with torch.no_grad():
        ours = model(torch.arange(1, 40)[None]).logits[0].numpy()
    assert np.abs(reference - ours).max() <= 1e-4 * max(1.0, float(np.abs(ours).max()))


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_weight_types(tmp_path, bpe, gguf_type):
    model = _random_model(model_type="moe", qk_norm=False)
    reader, fields = _read(export_gguf(model, bpe, tmp_path / "m.gguf", gguf_type))
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.ffn_up_exps.weight"] == types["token_embd.weight"] == gguf_type.upper()
    _check_weights(reader, model, "llama", gguf_type)


@pytest.mark.parametrize("kw,field", REFUSED)
def test_inexact_stacks_are_refused(kw, field):
    cfg = AdaptiveMoEModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, vocab_size=300,
                                 num_experts=4, device="cpu", use_fp8=False, **kw).validate()
    with pytest.raises(ExportError, match=field.replace("(", r"\(").replace(")", r"\)")):
        gguf_architecture(cfg.model)


def test_cli_refusal_is_one_line(runs, tmp_path):
    r = run_cli("export", runs["moe"], tmp_path / "x", "--format", "gguf", "--gguf-type", "q4")
    assert r.returncode == 2 and "--gguf-type" in r.stderr
    (tmp_path / "taken.gguf").write_bytes(b"not ours")
    r = run_cli("export", runs["moe"], tmp_path / "taken.gguf", "--format", "gguf")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "exists" in r.stderr
    assert (tmp_path / "taken.gguf").read_bytes() == b"not ours"


# ------------------------------------------------------------------ llama.cpp's graphs, in numpy
def _rope(x: np.ndarray, theta: float, neox: bool) -> np.ndarray:
    """x (seq, heads, dim) rotated as llama.cpp does: NEOX pairs (i, i + dim/2), NORM pairs (2i, 2i + 1)."""
    seq, _, dim = x.shape
    freqs = np.outer(np.arange(seq), theta ** (-np.arange(0, dim, 2) / dim))[:, None, :]
    cos, sin = np.cos(freqs), np.sin(freqs)
    a, b = (x[..., : dim // 2], x[..., dim // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.concatenate([ra, rb], -1) if neox else np.stack([ra, rb], -1).reshape(x.shape)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def gguf_reference_logits(reader, fields, arch: str, ids: list[int]) -> np.ndarray:
    """The logits of llama.cpp's llama / qwen3 / qwen2moe / qwen3moe graph, from the GGUF file alone."""
    t = {x.name: _dequantized(x).astype(np.float64) for x in reader.tensors}
    f = lambda key: fields[f"{arch}.{key}"]  # noqa: E731
    eps, theta, heads, kv = f("attention.layer_norm_rms_epsilon"), f("rope.freq_base"), f(
        "attention.head_count"), f("attention.head_count_kv")
    x = t["token_embd.weight"][ids]
    seq = len(ids)
    for i in range(f("block_count")):
        g = lambda name: t.get(f"blk.{i}.{name}")  # noqa: E731
        h = _rms(x, g("attn_norm.weight"), eps)
        q, k, v = (h @ g(f"attn_{n}.weight").T + (g(f"attn_{n}.bias") if g(f"attn_{n}.bias") is not None else 0)
                   for n in "qkv")
        q, k, v = q.reshape(seq, heads, -1), k.reshape(seq, kv, -1), v.reshape(seq, kv, -1)
        if g("attn_q_norm.weight") is not None:
            q, k = _rms(q, g("attn_q_norm.weight"), eps), _rms(k, g("attn_k_norm.weight"), eps)
        q, k = _rope(q, theta, arch != "llama"), _rope(k, theta, arch != "llama")
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(seq, -1) @ g("attn_output.weight").T
        x = x + _ffn(_rms(x, g("ffn_norm.weight"), eps), g, arch, fields)
    return (_rms(x, t["output_norm.weight"], eps) @ t["output.weight"].T).astype(np.float32)


def _ffn(h, g, arch, fields):
    if g("ffn_gate_inp.weight") is None:
        return (_silu(h @ g("ffn_gate.weight").T) * (h @ g("ffn_up.weight").T)) @ g("ffn_down.weight").T
    logits = h @ g("ffn_gate_inp.weight").T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = fields[f"{arch}.expert_used_count"]
    top = np.argsort(-probs, axis=-1)[:, :k]
    w = np.take_along_axis(probs, top, -1)
    if arch != "qwen2moe":  # llama (with experts) and qwen3moe renormalise; qwen2moe never does
        w = w / w.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for tok in range(h.shape[0]):
        for e, weight in zip(top[tok], w[tok]):
            a = _silu(g("ffn_gate_exps.weight")[e] @ h[tok]) * (g("ffn_up_exps.weight")[e] @ h[tok])
            out[tok] += weight * (g("ffn_down_exps.weight")[e] @ a)
    if g("ffn_gate_inp_shexp.weight") is not None:
        gate = 1 / (1 + np.exp(-(h @ g("ffn_gate_inp_shexp.weight").reshape(-1))))
        shared = (_silu(h @ g("ffn_gate_shexp.weight").T) * (h @ g("ffn_up_shexp.weight").T)) @ g(
            "ffn_down_shexp.weight").T
        out = out + gate[:, None] * shared
    return out


# ------------------------------------------------------------------ llama.cpp itself (llama-cpp-python)
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["standard", "moe"])
def test_llama_cpp_matches_our_engine(runs, tmp_path, kind, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    from blueberry.inference import Engine, SamplingParams

    out = tmp_path / f"{kind}.gguf"
    r = run_cli("export", runs[kind], out, "--format", "gguf", "--gguf-type", "f32")
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok = _load(runs[kind])
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=model.config.max_seq_len, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)  # f32 KV cache
    assert llm.tokenize(MIXED_TEXT.encode("utf-8"), add_bos=False, special=False) == tok.encode(MIXED_TEXT)
    prompt = [tok.prefix_id] + tok.encode("the king and the queen")
    engine = Engine(model, tok, slots=1)
    seq = engine.submit(prompt, SamplingParams(max_new_tokens=32, temperature=0.0, stop_at_eot=False))
    engine.run_until_done()
    llm.reset()
    llm.eval(prompt)
    with torch.no_grad():
        ours_last = model(torch.tensor([prompt])).logits[0, -1].numpy()
    theirs_last = np.array(llm.scores[len(prompt) - 1], dtype=np.float32)
    diff = float(np.abs(ours_last - theirs_last).max())
    theirs_ids = []
    for _ in range(32):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs_ids.append(nxt)
        llm.eval([nxt])
    equal = sum(a == b for a, b in zip(seq.output_ids, theirs_ids))
    with capsys.disabled():
        print(f"\n[llama.cpp {kind}] greedy tokens equal {equal}/32, last-position max |logit diff| {diff:.3g}")
    assert diff <= 0.01 * max(1.0, float(np.abs(ours_last).max()))  # bf16 tolerance
    assert seq.output_ids == theirs_ids


def _spec(pre, normalizer=None, **model):
    return {"pre_tokenizer": pre, "normalizer": normalizer,
            "model": {"type": "BPE", "byte_fallback": False, "ignore_merges": False, **model}}


def _split_then_bytes(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_pre_tokenizers_map_to_llama_cpp_names():
    from blueberry.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(_spec(gpt2)) == "gpt-2"
    assert pre_tokenizer_name(_spec(_split_then_bytes(LLAMA3_SPLIT), ignore_merges=True)) == "llama-bpe"
    assert pre_tokenizer_name(_spec(_split_then_bytes(QWEN2_SPLIT), {"type": "NFC"})) == "qwen2"
    refusals = [(_spec(_split_then_bytes(r"\s+|\w+")), "not a split llama.cpp knows"),
                (_spec(dict(gpt2, add_prefix_space=True)), "not a split llama.cpp knows"),
                (_spec(gpt2, {"type": "NFKC"}), "normalizer NFKC"),
                (_spec(gpt2, byte_fallback=True), "plain byte-level BPE"),
                (_spec(_split_then_bytes(LLAMA3_SPLIT)), "ignore_merges=False")]
    for spec, reason in refusals:
        with pytest.raises(ExportError, match=reason):
            pre_tokenizer_name(spec)


@pytest.mark.slow
def test_imported_run_keeps_its_tokenizer_and_template(tmp_path, bpe):
    """A transformers directory imported as a run exports to GGUF with its own tokenizer and chat template."""
    from blueberry.export import export_hf

    model = _random_model(model_type="standard", qk_norm=False)
    bpe.save(tmp_path / "tokenizer.json")
    export_hf(model, bpe, tmp_path / "hf")
    r = run_cli("import", tmp_path / "hf", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", tmp_path / "run", tmp_path / "imported", "--format", "gguf", "--gguf-type", "f32")
    assert r.returncode == 0, r.stderr[-3000:]
    reader, fields = _read(tmp_path / "imported.gguf")
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == PLAIN_JINJA
    imported, tok = _load(tmp_path / "run")
    assert type(tok).__name__ == "TransformersTokenizer"
    _check_vocab(fields, tok)
    _check_weights(reader, imported, "llama", "f32")


@pytest.mark.parametrize("kw,arch", MAPPED)
def test_llama_cpp_runs_every_mapped_architecture(tmp_path, bpe, kw, arch, capsys):
    """Every mapping (llama with its permuted q/k rows, Mixtral-style experts, qwen2moe with its shared
    expert and biases, qwen3 and qwen3moe) gives our logits at every position in llama.cpp itself."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _random_model(**kw)
    out = export_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    ids = [bpe.prefix_id] + bpe.encode(MIXED_TEXT)[:40]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(theirs - ours).max())
    with capsys.disabled():
        print(f"\n[llama.cpp {arch} {kw}] max |logit diff| over {len(ids)} positions {diff:.3g} "
              f"(logits up to {np.abs(ours).max():.1f})")
    assert diff <= 1e-4 * max(1.0, float(np.abs(ours).max()))
