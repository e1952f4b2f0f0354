"""The fused chunked linear cross-entropy against float64 autograd on full logits."""

import pytest
import torch
import torch.nn.functional as F

from blueberry.ops import cross_entropy
from blueberry.ops.cross_entropy import linear_cross_entropy


def reference(h, w, targets):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy((h64 @ w64.t()).view(-1, w.shape[0]), targets.view(-1), ignore_index=-100)
    loss.backward()
    return loss, h64.grad, w64.grad


@pytest.mark.parametrize("chunk", [7, 64, 10_000])  # several chunks with a ragged last one, and one
def test_matches_float64_reference_loss_and_gradients(monkeypatch, chunk):
    monkeypatch.setattr(cross_entropy, "chunk_rows", lambda vocab, device_type: chunk)
    torch.manual_seed(3)
    h = torch.randn(3, 41, 32, requires_grad=True)
    w = (torch.randn(97, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 97, (3, 41))
    targets[0, :5] = -100  # ignored positions are left out of the mean
    loss = linear_cross_entropy(h, w, targets)
    (loss * 2.5).backward()  # the incoming gradient scales both results
    ref_loss, ref_h, ref_w = reference(h, w, targets)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), 2.5 * ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 2.5 * ref_w, rtol=1e-4, atol=1e-6)
    assert h.grad[0, :5].abs().max() == 0


def test_bf16_autocast_is_close_to_float64():
    torch.manual_seed(4)
    h = torch.randn(256, 64, requires_grad=True)
    w = (torch.randn(512, 64) * 0.2).requires_grad_()
    targets = torch.randint(0, 512, (256,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_loss, ref_h, ref_w = reference(h, w, targets)
    # bf16 matmuls: ~3 significant digits
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=5e-2, atol=2e-4)
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=5e-2, atol=2e-4)


def test_without_gradients_only_the_loss_is_computed():
    torch.manual_seed(5)
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, targets)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), targets))


def test_compiled_matches_eager():
    torch.manual_seed(6)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    eager = linear_cross_entropy(h, w, targets)
    eager.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager")(h, w, targets)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close((h.grad, w.grad), grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_float64():
    torch.manual_seed(7)
    h = torch.randn(4096, 128, device="cuda", requires_grad=True)
    w = (torch.randn(1000, 128, device="cuda") * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (4096,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets)
    loss.backward()
    ref_loss, ref_h, ref_w = reference(h, w, targets)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=5e-2, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=5e-2, atol=1e-4)
