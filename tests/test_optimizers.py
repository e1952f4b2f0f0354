import copy

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.models import create_model
from blueberry.optimizers import (Lion, Muon, MuonWithWarmup, get_lr_scheduler, lr_factor, setup_optimizers,
                                  zeropower_via_newtonschulz5)
from blueberry.optimizers.muon import update_scale


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (48, 96), (200, 64), (4, 48, 16)])
def test_newton_schulz_singular_values(shape):
    G = torch.randn(*shape)
    X = zeropower_via_newtonschulz5(G).float()
    s = torch.linalg.svdvals(X)
    assert s.min() >= 0.5 and s.max() <= 1.5, (s.min(), s.max())


def test_newton_schulz_square_with_bounded_condition_number():
    # A square Gaussian matrix has singular values near 0 that 5 steps cannot lift (nor need to: Muon
    # only asks for a rough orthogonalisation); with condition number <= 20 they all land in range.
    U, _ = torch.linalg.qr(torch.randn(64, 64))
    V, _ = torch.linalg.qr(torch.randn(64, 64))
    G = U @ torch.diag(torch.linspace(0.05, 1.0, 64)) @ V.T
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G).float())
    assert s.min() >= 0.5 and s.max() <= 1.5, (s.min(), s.max())


def reference_muon_step(W, grad, buf, lr, momentum, wd):
    """float64 reference of the same algorithm (Nesterov, lerp momentum, shape scaling)."""
    W, grad, buf = W.double(), grad.double(), buf.double()
    buf = momentum * buf + (1 - momentum) * grad
    upd = grad + momentum * (buf - grad)
    a, b, c = 3.4445, -4.7750, 2.0315
    X = upd.mT if upd.shape[-2] > upd.shape[-1] else upd
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if upd.shape[-2] > upd.shape[-1]:
        X = X.mT
    scale = max(1.0, W.shape[-2] / W.shape[-1]) ** 0.5
    return W * (1 - lr * wd) - lr * scale * X, buf


@pytest.mark.parametrize("shape", [(24, 16), (16, 40), (3, 24, 16)])
def test_muon_update_equals_float64_reference(shape):
    W0 = torch.randn(*shape)
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float64)
    buf = torch.zeros(shape, dtype=torch.float64)
    W = W0.double()
    for _ in range(3):
        g = torch.randn(*shape)
        p.grad = g.clone()
        opt.step()
        W, buf = reference_muon_step(W, g, buf, 0.05, 0.9, 0.1)
    torch.testing.assert_close(p.data.double(), W, atol=1e-5, rtol=1e-5)


def test_same_shape_matrices_orthogonalised_together_equal_the_reference():
    # three (24, 16) matrices share one stacked Newton-Schulz; a (16, 40) one runs alone
    shapes = [(24, 16), (16, 40), (24, 16), (24, 16)]
    W0 = [torch.randn(*s) for s in shapes]
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float64)
    refs = [(w.double(), torch.zeros(w.shape, dtype=torch.float64)) for w in W0]
    for _ in range(2):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        refs = [reference_muon_step(W, g, buf, 0.05, 0.9, 0.1) for (W, buf), g in zip(refs, grads)]
    for p, (W, _) in zip(params, refs):
        torch.testing.assert_close(p.data.double(), W, atol=1e-5, rtol=1e-5)


def test_row_blocks_orthogonalise_gate_and_up_separately():
    # an expert weight (E, 2F, D) holding [gate; up] with row_blocks=2 gets the update of two separate
    # (F, D) matrices per expert, scaled by the (F, D) shape
    E, F_, D = 3, 8, 12
    W0 = torch.randn(E, 2 * F_, D)
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([{"params": [p], "row_blocks": 2}], lr=0.05, momentum=0.9, weight_decay=0.0,
               ns_dtype=torch.float64)
    g = torch.randn(E, 2 * F_, D)
    p.grad = g.clone()
    opt.step()
    gate, up = reference_muon_step(W0[:, :F_], g[:, :F_], torch.zeros(E, F_, D), 0.05, 0.9, 0.0)[0], \
        reference_muon_step(W0[:, F_:], g[:, F_:], torch.zeros(E, F_, D), 0.05, 0.9, 0.0)[0]
    torch.testing.assert_close(p.data.double(), torch.cat([gate, up], dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_parameters", [True, False])
def test_expert_stacks_of_every_layer_joined_equal_the_reference(batch_parameters):
    # three layers' (E, 2F, D) [gate; up] stacks share one Newton-Schulz call (or one call each): every
    # matrix still gets its own float64-reference update
    E, F_, D = 2, 8, 12
    W0 = [torch.randn(E, 2 * F_, D) for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = Muon([{"params": params, "row_blocks": 2}], lr=0.05, momentum=0.9, weight_decay=0.1,
               ns_dtype=torch.float64, batch_parameters=batch_parameters)
    grads = [torch.randn(E, 2 * F_, D) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    zero = torch.zeros(E, F_, D)
    for p, w, g in zip(params, W0, grads):
        halves = [reference_muon_step(w[:, rows], g[:, rows], zero, 0.05, 0.9, 0.1)[0]
                  for rows in (slice(0, F_), slice(F_, 2 * F_))]
        torch.testing.assert_close(p.data.double(), torch.cat(halves, dim=1), atol=1e-5, rtol=1e-5)


def test_hybrid_setup_splits_gated_expert_up_projections():
    cfg = AdaptiveMoEModelConfig(model_type="moe", vocab_size=300, d_model=32, n_layers=2, n_heads=2,
                                 num_experts=4, max_seq_len=16, device="cpu").validate()
    model = create_model(cfg)
    muon = setup_optimizers(model, cfg)[0]
    blocks = {id(q): g["row_blocks"] for g in muon.param_groups for q in g["params"]}
    for block in model.blocks:
        assert blocks[id(block.ffn.w_up)] == 2 and blocks[id(block.ffn.w_down)] == 1
        assert blocks[id(block.attn.q_proj.weight)] == 1


def test_batched_3d_equals_per_matrix():
    G = torch.randn(5, 24, 16)
    batched = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    single = torch.stack([zeropower_via_newtonschulz5(g, dtype=torch.float32) for g in G])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_update_scale_modes():
    assert update_scale(torch.Size([64, 16])) == 2.0
    assert update_scale(torch.Size([16, 64])) == 1.0
    assert update_scale(torch.Size([16, 64]), "adamw") == pytest.approx(0.2 * 8)


def _train(opt_factory, steps, state=None):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = opt_factory([p])
    if state is not None:
        p.data.copy_(state["p"])
        opt.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(len(str(state)) if state else 1)
    out = []
    for _ in range(steps):
        p.grad = torch.randn(16, 8, generator=g)
        opt.step()
        out.append(p.detach().clone())
    return p, opt, out


@pytest.mark.parametrize("factory", [
    lambda ps: MuonWithWarmup(ps, lr=0.02, momentum_warmup_steps=5),
    lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
])
def test_state_dict_round_trip_resumes_identically(factory):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = factory([p])
    grads = [torch.randn(16, 8) for _ in range(6)]
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved = {"p": p.detach().clone(), "opt": copy.deepcopy(opt.state_dict())}
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(saved["p"].clone())
    opt2 = factory([q])
    opt2.load_state_dict(saved["opt"])
    for g in grads[3:]:
        q.grad = g.clone()
        opt2.step()
    assert torch.equal(p, q)


def test_momentum_warmup_reaches_target():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = MuonWithWarmup([p], momentum=0.95, momentum_start=0.85, momentum_warmup_steps=10)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)
    for i in range(12):
        p.grad = torch.randn(8, 8)
        opt.step()
        if i == 4:
            assert opt.param_groups[0]["momentum"] == pytest.approx(0.90)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)


def test_lion_matches_its_definition():
    p = torch.nn.Parameter(torch.randn(5))
    w0 = p.detach().clone()
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.randn(5)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * torch.sign(0.1 * g))
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * g)


@pytest.mark.parametrize("kind", ["cosine_warmup", "linear_warmup", "wsd"])
def test_schedule_reaches_final_lr_at_last_optimizer_step(kind):
    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=1, n_heads=4, max_seq_len=16, device="cpu",
                                 max_steps=20, warmup_steps=3, grad_accum_steps=4, min_lr_ratio=0.1,
                                 schedule=kind).validate()
    p = torch.nn.Parameter(torch.randn(4, 4))
    opts = [torch.optim.SGD([p], lr=1.0), torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.5)]
    sched = get_lr_scheduler(opts, cfg)
    seen = []
    for step in range(cfg.max_steps):  # one scheduler step per optimizer step, whatever the accumulation
        seen.append([g["lr"] for o in opts for g in o.param_groups])
        sched.step()
    assert seen[0] == pytest.approx([1 / 3, 0.5 / 3])
    assert seen[-1] == pytest.approx([0.1, 0.05])  # final value exactly at the last optimizer step
    assert seen[-2][0] > 0.1


def test_constant_schedule_and_factor_values():
    assert lr_factor(0, "constant", 10, 2, 0.1) == 0.5
    assert lr_factor(9, "constant", 10, 2, 0.1) == 1.0
    assert lr_factor(5, "cosine_warmup", 11, 0, 0.0) == pytest.approx(0.5)


def test_hybrid_setup_assigns_roles():
    cfg = AdaptiveMoEModelConfig(model_type="moe", d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                                 vocab_size=300, num_experts=4, device="cpu", use_fp8=False,
                                 tie_embeddings=False).validate()
    model = create_model(cfg)
    muon, adamw = setup_optimizers(model, cfg)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not muon_ids & adam_ids
    assert muon_ids | adam_ids == {id(p) for p in model.parameters()}
    assert id(model.blocks[0].ffn.w_up) in muon_ids and id(model.blocks[0].attn.q_proj.weight) in muon_ids
    for p in (model.embed.weight, model.lm_head.weight, model.blocks[0].ffn.router.weight, model.norm.weight):
        assert id(p) in adam_ids
    assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_single_optimizers_train(name):
    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=1, n_heads=4, max_seq_len=16, vocab_size=300,
                                 num_experts=2, device="cpu", use_fp8=False, optimizer=name).validate()
    model = create_model(cfg)
    (opt,) = setup_optimizers(model, cfg)
    idx = torch.randint(0, 300, (4, 16))
    first = None
    for _ in range(15):
        loss = model(idx, idx).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
