"""FP8 numerics on CPU (float8 matmuls run on CPU in this torch), dispatch, --no-fp8, and the decode product."""

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.models import AdaptiveLinear, create_model
from blueberry.ops import fp8_linear, fp8_shapes_qualify, matmul, to_float8
import importlib

matmul_module = importlib.import_module("blueberry.ops.matmul")
from blueberry.training.auto_batch import largest_fitting_batch, plan_accumulation

FP8_TOLERANCE = 0.08  # relative Frobenius error of e4m3 (3 mantissa bits) / e5m2 (2 bits) products


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_matches_bf16_within_tolerance():
    x = torch.randn(48, 256, requires_grad=True)
    w = torch.randn(512, 256, requires_grad=True)
    y = fp8_linear(x, w, out_dtype=torch.float32)
    g = torch.randn_like(y)
    y.backward(g)
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    yb = xb @ wb.t()
    yb.backward(g.bfloat16())
    assert rel(y, yb) < FP8_TOLERANCE
    assert rel(x.grad, xb.grad) < FP8_TOLERANCE
    assert rel(w.grad, wb.grad) < FP8_TOLERANCE
    assert rel(y, yb) > 1e-4  # it really is FP8: not bit-identical to bf16


def test_to_float8_scales_to_the_format_range():
    t = torch.randn(64, 64) * 1e-3
    t8, inv = to_float8(t, torch.float8_e4m3fn)
    assert t8.dtype == torch.float8_e4m3fn
    assert t8.float().abs().max().item() == pytest.approx(448.0)
    torch.testing.assert_close(t8.float() * inv, t, rtol=0.07, atol=1e-6)


def test_fp8_handles_leading_dims_and_odd_rows():
    x = torch.randn(3, 7, 256)
    w = torch.randn(256, 256)
    y = fp8_linear(x, w, out_dtype=torch.float32)
    assert y.shape == (3, 7, 256) and rel(y, x @ w.t()) < FP8_TOLERANCE


def test_shape_qualification():
    assert fp8_shapes_qualify(256, 512)
    assert not fp8_shapes_qualify(250, 512)  # not a multiple of 16
    assert not fp8_shapes_qualify(64, 64)  # too small to pay


def test_adaptive_linear_is_torchaos_float8_linear_when_asked_and_nn_linear_otherwise():
    """The seed's AdaptiveLinear(use_fp8=True): torchao's Float8Linear on the same weights, to the bit, forward
    and backward (and really FP8: off the fp32 product by FP8's rounding); otherwise exactly nn.Linear."""
    pytest.importorskip("torchao")
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    lin = AdaptiveLinear(256, 512, bias=True, use_fp8=True)
    reference = Float8Linear.from_float(torch.nn.Linear(256, 512, bias=True), config=Float8LinearConfig())
    reference.load_state_dict(lin.state_dict())
    x = torch.randn(48, 256, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = lin(x), reference(xr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad) and torch.equal(lin.weight.grad, reference.weight.grad)
    assert 0 < rel(y, torch.nn.functional.linear(x, lin.weight, lin.bias)) < FP8_TOLERANCE
    assert list(lin.state_dict()) == ["weight", "bias"]  # the torchao twin is not a second copy
    x = torch.randn(4, 256)
    plain = AdaptiveLinear(256, 512, use_fp8=False)
    assert torch.equal(plain(x), torch.nn.functional.linear(x, plain.weight))
    small = AdaptiveLinear(64, 64, use_fp8=True)  # too small to repay the casts: the plain product
    assert torch.equal(small(x[:, :64]), torch.nn.functional.linear(x[:, :64], small.weight))
    w = torch.randn(256, 512)
    torch.testing.assert_close(matmul(x, w, use_fp8=False), x @ w)
    assert 0 < rel(matmul(x, w, use_fp8=True), x @ w) < FP8_TOLERANCE  # the functional form: ops.fp8


def test_no_fp8_leaves_every_layer_in_bf16(monkeypatch):
    from blueberry.training.float8 import apply_float8

    def forbidden(*a, **k):
        raise AssertionError("FP8 used although --no-fp8")

    monkeypatch.setattr(matmul_module, "fp8_linear", forbidden)
    cfg = AdaptiveMoEModelConfig(d_model=256, n_layers=1, n_heads=4, max_seq_len=16, vocab_size=512,
                                 device="cpu", use_fp8=False).validate()
    model = apply_float8(create_model(cfg), cfg.use_fp8)
    assert {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)} == {"Linear"}
    idx = torch.randint(0, 512, (2, 16))
    model(idx, idx).loss.backward()


def test_fp8_transform_converts_the_block_linears_and_trains_on_cpu():
    from blueberry.training.float8 import apply_float8

    cfg = AdaptiveMoEModelConfig(d_model=256, n_layers=1, n_heads=4, max_seq_len=16, vocab_size=512,
                                 device="cpu", use_fp8=False, model_type="standard").validate()
    model = create_model(cfg)
    reference = create_model(cfg)
    reference.load_state_dict(model.state_dict())
    apply_float8(model, True)  # the numerics run on CPU; the speed needs a GPU
    converted = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    assert converted == {f"blocks.0.attn.{p}_proj" for p in "qkvo"} | {f"blocks.0.ffn.{p}" for p in ("gate", "up", "down")}
    idx = torch.randint(0, 512, (2, 16))
    out = model(idx, idx)
    out.loss.backward()
    with torch.no_grad():
        ref = reference(idx, idx).loss
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.02 * ref.item()
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert set(model.state_dict()) == set(reference.state_dict())  # checkpoints keep their names


def test_auto_batch_backs_off_on_oom():
    tried = []

    def step(batch):
        tried.append(batch)
        if batch > 12:
            raise torch.cuda.OutOfMemoryError("fake")

    assert largest_fitting_batch(step, 64) == 8
    assert tried == [64, 32, 16, 8]
    assert plan_accumulation(64, 8) == 8
    with pytest.raises(RuntimeError, match="does not fit"):
        largest_fitting_batch(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_on_gpu_matches_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    assert rel(fp8_linear(x, w), x @ w.t()) < FP8_TOLERANCE


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_bf16_causal_attention_matches_float64(kv_heads):
    from blueberry.ops.attention import causal_attention, uses_matmul_form

    torch.manual_seed(11)
    q = torch.randn(2, 4, 37, 16)
    k, v = torch.randn(2, kv_heads, 37, 16), torch.randn(2, kv_heads, 37, 16)
    assert uses_matmul_form(q.bfloat16(), 0.0)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=kv_heads != 4)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    got_in = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    got = causal_attention(*got_in)
    got.backward(grad_out.bfloat16())
    torch.testing.assert_close(got.double(), ref.detach(), atol=3e-2, rtol=3e-2)
    for g, r in zip(got_in, ref_in):
        torch.testing.assert_close(g.grad.double(), r.grad, atol=5e-2, rtol=5e-2)


def test_causal_attention_leaves_fp32_long_sequences_and_dropout_to_sdpa():
    from blueberry.ops.attention import MATMUL_FORM_MAX_SEQ, uses_matmul_form

    assert not uses_matmul_form(torch.zeros(1, 1, 8, 4), 0.0)  # fp32
    assert not uses_matmul_form(torch.zeros(1, 1, MATMUL_FORM_MAX_SEQ + 1, 4, dtype=torch.bfloat16), 0.0)
    assert not uses_matmul_form(torch.zeros(1, 1, 8, 4, dtype=torch.bfloat16), 0.1)


@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 96), (3, 96), (4, 96), (8, 1, 96), (3, 5, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_linear_equals_float64_in_the_decode_layout(shape, bias):
    """The decode product (oneDNN for ONEDNN_FROM_ROWS rows or more by a weight stored by input rows, else F.linear)
    against float64 math, on fresh random inputs; the layer swap keeps the same parameters."""
    from blueberry.models.layers import InferenceLinear, stored_transposed
    from blueberry.ops.matmul import inference_linear

    x, w = torch.randn(*shape), torch.randn(40, 96)
    b = torch.randn(40) if bias else None
    expected = x.double() @ w.double().t() + (b.double() if bias else 0)
    for weight in (w, stored_transposed(w)):
        y = inference_linear(x, weight, b)
        assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    layer = torch.nn.Linear(96, 40, bias=bias)
    layer.weight = torch.nn.Parameter(stored_transposed(layer.weight), requires_grad=False)  # as fuse_projections
    swapped = InferenceLinear.of(layer)
    assert swapped.weight is layer.weight and list(swapped.state_dict()) == list(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), layer(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,qkv_bias,qk_norm", [(4, False, True), (2, True, True), (2, False, False)])
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_attention_equals_the_unfused_one(dtype, kv_heads, qkv_bias, qk_norm, transposed):
    """The inference form of attention (q/k/v in one matmul, q's and k's heads normalised and rotated
    together) against the module as trained, on a KV cache at scattered positions, GQA and biases."""
    import copy

    from blueberry.models.attention import MultiHeadAttention

    torch.manual_seed(3)
    trained = MultiHeadAttention(64, 4, 32, n_kv_heads=kv_heads, qk_norm=qk_norm, qkv_bias=qkv_bias).to(dtype)
    if qk_norm:
        for norm in (trained.q_norm, trained.k_norm):
            norm.weight.data.uniform_(0.5, 1.5)
    fused = copy.deepcopy(trained)
    fused.fuse_projections(transposed)
    x = torch.randn(3, 5, 64, dtype=dtype)
    positions = torch.stack([torch.arange(5) + start for start in (0, 7, 20)])
    with torch.no_grad():
        outputs = [m(x, kv_cache=m.new_cache(3, 32, "cpu", dtype), positions=positions) for m in (trained, fused)]
    if dtype == torch.float32:
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    else:  # the same roundings but for the matmul's order
        torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-2, atol=2e-2)
