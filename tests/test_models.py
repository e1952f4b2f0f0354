import math

import pytest
import torch
import torch.nn.functional as F

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.models import (AdaptiveLinear, AdaptiveMoEMinimalLLM, MixtureOfExperts, MultiHeadAttention,
                              RotaryEmbedding, create_model)
from blueberry.ops.grouped_mm import expert_matmul


def cfg(**kw):
    base = dict(model_type="moe", d_model=32, n_layers=2, n_heads=4, max_seq_len=16, batch_size=2, num_experts=4,
                vocab_size=300, device="cpu", use_fp8=False)
    base.update(kw)
    return AdaptiveMoEModelConfig(**base).validate()


def naive_rope(x, theta=10000.0, start=0):
    """float64 rotary: pairs (i, i + d/2) rotated by angle pos * theta^(-2i/d)."""
    b, h, t, d = x.shape
    x = x.double()
    pos = torch.arange(start, start + t, dtype=torch.float64)
    out = torch.empty_like(x)
    for i in range(d // 2):
        ang = pos * theta ** (-2 * i / d)
        c, s = ang.cos(), ang.sin()
        out[..., i] = x[..., i] * c - x[..., i + d // 2] * s
        out[..., i + d // 2] = x[..., i + d // 2] * c + x[..., i] * s
    return out


def test_rope_matches_float64_reference():
    rope = RotaryEmbedding(8, 64, 10000.0)
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    rq, rk = rope(q, k, positions=torch.arange(5, 15).expand(2, 10))
    torch.testing.assert_close(rq.double(), naive_rope(q, start=5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk.double(), naive_rope(k, start=5), atol=1e-5, rtol=1e-5)
    rq0, _ = rope(q, k)
    torch.testing.assert_close(rq0.double(), naive_rope(q, start=0), atol=1e-5, rtol=1e-5)


def test_rope_follows_bf16_inputs():
    rope = RotaryEmbedding(8, 16)
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    assert rope(q, q)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_matches_float64_reference(n_kv):
    attn = MultiHeadAttention(32, 4, 16, n_kv_heads=n_kv).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y = attn(x)
    hd = 8
    q = attn.q_proj(x).view(2, 9, 4, hd).transpose(1, 2)
    k = attn.k_proj(x).view(2, 9, n_kv, hd).transpose(1, 2)
    v = attn.v_proj(x).view(2, 9, n_kv, hd).transpose(1, 2)
    q, k = naive_rope(q), naive_rope(k)
    k, v = k.repeat_interleave(4 // n_kv, 1), v.repeat_interleave(4 // n_kv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)  # cos/sin are cached in fp32


def test_document_mask_blocks_attention_across_documents():
    attn = MultiHeadAttention(32, 4, 16).double()
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    y = attn(x, doc_ids=docs)
    # the second document alone gives the same outputs as inside the packed sequence (positions differ,
    # so compare the first document, which starts at position 0 in both)
    torch.testing.assert_close(y[:, :3], attn(x[:, :3]))
    x2 = x.clone()
    x2[:, :3] += 1.0  # changing document 0 must not change document 1's outputs
    torch.testing.assert_close(attn(x2, doc_ids=docs)[:, 3:], y[:, 3:])


def naive_moe(moe: MixtureOfExperts, x: torch.Tensor, training_capacity: bool, act=None):
    """Per-token loop in float64: route, (drop over capacity in token order), run experts, weight, sum."""
    xf = x.reshape(-1, x.shape[-1]).double()
    T, E, k = xf.shape[0], moe.num_experts, moe.top_k
    logits = xf @ moe.router.weight.double().t()
    probs = logits.softmax(-1)
    top_w, top_i = probs.topk(k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    cap = math.ceil(moe.capacity_factor * T * k / E) if training_capacity and moe.capacity_factor > 0 else None
    used = [0] * E
    out = torch.zeros_like(xf)
    w_up, w_down = moe.w_up.double(), moe.w_down.double()
    counts = torch.zeros(E, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(top_i[t, j])
            counts[e] += 1
            if cap is not None and used[e] >= cap:
                continue
            used[e] += 1
            h = w_up[e] @ xf[t]
            if act is None:
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            else:
                h = act(h)
            out[t] += top_w[t, j] * (w_down[e] @ h)
    load = counts / (T * k)
    lb = E * (load * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return out.reshape(x.shape), lb, z, load


@pytest.mark.parametrize("capacity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("grouped", [True, False])
def test_moe_matches_naive_reference(capacity, grouped):
    moe = MixtureOfExperts(16, 24, num_experts=4, top_k=2, capacity_factor=capacity, use_grouped_mm=grouped)
    nn_init = torch.nn.init
    nn_init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(3, 7, 16)
    moe.train()
    y, aux = moe(x)
    ref, lb, z, load = naive_moe(moe, x, training_capacity=True)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aux.load_balancing_loss.double(), lb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux.z_loss.double(), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.expert_load.double(), load)
    assert torch.isclose(aux.loss, 0.01 * aux.load_balancing_loss + 0.001 * aux.z_loss)
    if capacity == 0.5:
        assert aux.dropped_fraction > 0
    moe.eval()  # evaluation is dropless
    ref_eval, *_ = naive_moe(moe, x, training_capacity=False)
    torch.testing.assert_close(moe(x)[0].double(), ref_eval, atol=1e-5, rtol=1e-4)


def test_relu_squared_feed_forwards_match_transformers_activation():
    """`--mlp-type relu2`: the MLP and each MoE expert are down(relu(up x)²), with transformers' ReLU² as
    the reference activation (float64)."""
    from transformers.activations import ACT2FN

    from blueberry.models.layers import make_mlp

    relu2 = ACT2FN["relu2"]
    mlp = make_mlp("relu2", 16, 40).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), relu2(x @ mlp.up.weight.t()) @ mlp.down.weight.t())
    moe = MixtureOfExperts(16, 24, num_experts=4, top_k=2, capacity_factor=0.0, mlp_type="relu2")
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    moe.eval()
    x = torch.randn(3, 7, 16)
    ref, *_ = naive_moe(moe, x, training_capacity=False, act=relu2)
    torch.testing.assert_close(moe(x)[0].double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("capacity", [0.0, 0.5])
def test_dispatch_groups_are_aligned_with_a_fixed_total(capacity):
    moe = MixtureOfExperts(16, 24, num_experts=4, top_k=2, capacity_factor=capacity)
    T, align = 21, 8
    flat_expert = torch.randint(0, 4, (T * 2,))
    counts, kept, sizes, slot_token, slot_choice = moe.dispatch(flat_expert, T, align)
    rows = 48 + 4 * align  # round_up(42, 8) + experts * align, whatever the routing
    assert slot_token.shape == (rows,) and int(sizes.sum()) == rows and bool((sizes % align == 0).all())
    starts = torch.cumsum(sizes, 0) - sizes
    for e in range(4):
        group = slice(int(starts[e]), int(starts[e]) + int(sizes[e]))
        real = slot_choice[group] < T * 2
        assert int(real.sum()) == int(kept[e])  # kept choices first, then padding rows
        assert bool(real[:int(kept[e])].all())
        assert bool((flat_expert[slot_choice[group][real]] == e).all())
        assert bool((slot_token[group][real] == slot_choice[group][real] // 2).all())
        assert bool((slot_token[group][~real] == T).all())  # padding reads the zero row


@pytest.mark.parametrize("capacity", [0.0, 0.5])
def test_moe_compiles_as_one_graph(capacity):
    moe = MixtureOfExperts(16, 24, num_experts=4, top_k=2, capacity_factor=capacity)
    x = torch.randn(2, 9, 16)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")  # fails on any graph break
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x)[0], moe(x)[0])
    # fp32 under compile takes the slice loop (grouped_mm compiles for bf16 only): same result
    torch.testing.assert_close(torch.compile(moe, backend="aot_eager")(x)[0], moe(x)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_on_cuda_bf16_matches_cpu_fp32():
    moe = MixtureOfExperts(64, 96, num_experts=8, top_k=2)
    x = torch.randn(4, 33, 64)
    expected = moe(x)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = moe.cuda()(x.cuda())[0]
    torch.testing.assert_close(got.float().cpu(), expected, atol=3e-2, rtol=3e-2)


def test_loss_weights_come_from_config():
    model = create_model(cfg(load_balancing_weight=0.5, router_z_loss_weight=0.0))
    moe = model.blocks[0].ffn
    assert moe.load_balancing_weight == 0.5 and moe.z_loss_weight == 0.0


def test_every_expert_with_tokens_gets_gradient():
    moe = MixtureOfExperts(16, 24, num_experts=4, top_k=2)
    x = torch.randn(4, 8, 16)
    y, aux = moe(x)
    (y.pow(2).mean() + aux.loss).backward()
    counts = torch.bincount(moe.route(x.reshape(-1, 16))[3].reshape(-1), minlength=4)
    for e in range(4):
        got_grad = moe.w_up.grad[e].abs().sum() > 0
        assert bool(got_grad) == bool(counts[e] > 0)
    assert moe.router.weight.grad.abs().sum() > 0


def test_grouped_mm_equals_slice_loop():
    x = torch.randn(10, 8)
    w = torch.randn(3, 5, 8)
    counts = torch.tensor([3, 0, 7])
    torch.testing.assert_close(expert_matmul(x, w, counts, True), expert_matmul(x, w, counts, False))


def test_shared_expert_is_used():
    moe = MixtureOfExperts(16, 24, num_experts=4, top_k=1, shared_expert=True)
    assert moe.shared is not None
    x = torch.randn(2, 3, 16)
    y, _ = moe(x)
    moe.shared_gate.weight.data.fill_(-1e4)  # gate closed: only the routed experts remain
    y_closed, _ = moe(x)
    assert not torch.allclose(y, y_closed)


def test_parameter_report_counts_active_parameters():
    model = AdaptiveMoEMinimalLLM(cfg(num_experts=4, expert_top_k=1))
    rep = model.parameter_report()
    per_expert = model.blocks[0].ffn.expert_parameters_per_expert()
    assert rep["total"] == sum(p.numel() for p in model.parameters())
    assert rep["total"] - rep["active_per_token"] == 2 * 3 * per_expert  # 2 layers x 3 idle experts
    dense = create_model(cfg(model_type="standard"))
    assert dense.parameter_report()["total"] == dense.parameter_report()["active_per_token"]


@pytest.mark.parametrize("model_type,n_kv", [("moe", 4), ("standard", 2)])
def test_kv_cache_generation_equals_uncached(model_type, n_kv):
    model = create_model(cfg(model_type=model_type, n_kv_heads=n_kv, max_seq_len=32)).eval()
    prompt = torch.randint(0, 300, (2, 5))
    cached = torch.cat(list(model.generate(prompt, 20, temperature=0, use_cache=True)), 1)
    plain = torch.cat(list(model.generate(prompt, 20, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, plain)


def test_generation_samples_respect_top_k():
    from blueberry.models import sample_next

    logits = torch.randn(3, 50)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok = sample_next(logits, 1.0, top_k=3, generator=g)
        allowed = logits.topk(3).indices
        assert all(tok[i, 0] in allowed[i] for i in range(3))


def test_adaptive_linear_matches_nn_linear():
    lin = AdaptiveLinear(16, 8, bias=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))


def test_model_forward_backward_and_tied_weights():
    model = create_model(cfg())
    assert model.lm_head.weight is model.embed.weight
    idx = torch.randint(0, 300, (2, 16))
    out = model(idx, idx, return_logits=True)
    assert out.logits.shape == (2, 16, 300) and torch.isfinite(out.loss)
    reference = torch.nn.functional.cross_entropy(out.logits.view(-1, 300), idx.view(-1))
    torch.testing.assert_close(out.lm_loss, reference)
    assert model(idx, idx).logits is None  # a training call does not build the full logits
    assert len(out.expert_load) == 2
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_logits_at_selects_positions_of_the_full_logits():
    from blueberry.models.ensemble import EnsembleLM

    torch.manual_seed(3)
    members = [create_model(cfg(num_experts=4)).eval(), create_model(cfg(num_experts=4)).eval()]
    idx = torch.randint(0, members[0].config.vocab_size, (3, 11))
    mask = torch.rand(3, 11) < 0.4
    for model in (members[0], EnsembleLM(members).eval()):
        full = model(idx).logits
        torch.testing.assert_close(model(idx, logits_at=mask).logits, full[mask])
