"""What keeps a GPU step busy, checked on the CPU where it can be: the MoE forward and the compiled model
have no graph break (no host synchronisation in routing, counts, offsets or aux losses), the compiled
training step does not recompile from one step to the next, `--fp8 auto|on|off` parses as documented, and
the FP8 decision is measured, cached and never overrides a given value. The FP8 kernels themselves run
only on a GPU with FP8 grouped GEMMs (skipped elsewhere)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blueberry.cli.args import overrides_from
from blueberry.cli.main import build_parser
from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.models import MixtureOfExperts, create_model
from blueberry.ops.grouped_mm import expert_matmul, fp8_expert_matmul
from blueberry.system import detect_capabilities
from blueberry.training import fp8_choice


def tiny_moe_config(**kw):
    base = dict(model_type="moe", d_model=32, n_layers=1, n_heads=4, max_seq_len=16, batch_size=2, num_experts=4,
                vocab_size=300, device="cpu", use_fp8=False, compile=False)
    base.update(kw)
    return AdaptiveMoEModelConfig(**base).validate()


@pytest.mark.parametrize("capacity", [0.0, 1.25])
def test_moe_training_forward_has_no_graph_break(capacity):
    torch._dynamo.reset()
    moe = MixtureOfExperts(64, 128, num_experts=4, top_k=2, capacity_factor=capacity).train()
    x = torch.randn(2, 32, 64, requires_grad=True)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, aux = moe(x)
        return out.float().pow(2).mean() + aux.loss + aux.dropped_fraction

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_moe_model_training_forward_has_no_graph_break():
    torch._dynamo.reset()
    model = create_model(tiny_moe_config(n_layers=2)).train()
    idx = torch.randint(0, 300, (2, 16))

    def step(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, idx)
        return out.loss, out.moe_stats

    explained = torch._dynamo.explain(step)(idx)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_training_step_does_not_recompile():
    """Steps 2..4 of a compiled MoE model (new tokens every step, routing counts changing) reuse step 1's
    graphs: nothing in the step depends on a value that changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(tiny_moe_config()).train()
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    graphs = []
    for _ in range(4):
        idx = torch.randint(0, 300, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(idx, idx).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1
    assert graphs[1:] == [graphs[0]] * 3, f"recompiled: unique graphs after each step {graphs}"


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--fp8"], True), (["--fp8", "on"], True), (["--fp8", "off"], False), (["--no-fp8"], False),
    (["--fp8", "auto"], None),
])
def test_fp8_flag_auto_on_off(argv, expected):
    args = build_parser().parse_args(["train", *argv])
    overrides = overrides_from(args)
    if expected is None:
        assert "use_fp8" not in overrides  # auto: left to the machine, as when the flag is absent
    else:
        assert overrides["use_fp8"] is expected


def test_fp8_flag_rejects_other_values(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "--fp8", "maybe"])
    assert exc.value.code == 2
    assert "--fp8" in capsys.readouterr().err


@pytest.mark.serial  # a wall-time measurement: beside another test a preemption can outweigh the difference
def test_time_variants_ranks_the_cheaper_callable():
    small, big = torch.randn(64, 64), torch.randn(384, 384)
    times = fp8_choice.time_variants({"small": lambda: small @ small, "big": lambda: big @ big @ big}, repeats=5)
    assert times["small"] < times["big"]


def test_no_fp8_device_is_never_measured(tmp_path):
    config = tiny_moe_config(use_fp8=None)
    assert config.use_fp8 is False  # the CPU has no FP8: the default is off, nothing to measure
    model = create_model(config)
    assert fp8_choice.choose_fp8(model, config, tmp_path) is False
    assert not (tmp_path / fp8_choice.CACHE_FILE).exists()


def test_fp8_verdict_is_measured_once_and_cached(tmp_path, monkeypatch, capsys):
    """On a device with FP8 the verdict follows the measurement, is cached per key, and the cached verdict
    is reused without measuring again."""
    config = tiny_moe_config()
    caps = dataclasses.replace(detect_capabilities("cpu"), supports_fp8=True)
    monkeypatch.setattr(type(config), "capabilities", lambda self: caps)
    calls = []

    def measured(model, cfg, device):
        calls.append(1)
        return {"bf16": 2.0e-3, "fp8": 3.0e-3}  # FP8 slower at these shapes

    monkeypatch.setattr(fp8_choice, "measure_blocks", measured)
    model = create_model(config)
    assert fp8_choice.choose_fp8(model, config, tmp_path) is False
    capsys.readouterr()
    assert fp8_choice.choose_fp8(model, config, tmp_path) is False
    assert len(calls) == 1 and "measured before" in capsys.readouterr().out
    bigger = tiny_moe_config(batch_size=4)  # another shape: another key, measured anew
    monkeypatch.setattr(type(bigger), "capabilities", lambda self: caps)
    monkeypatch.setattr(fp8_choice, "measure_blocks", lambda m, c, d: {"bf16": 3.0e-3, "fp8": 2.0e-3})
    assert fp8_choice.choose_fp8(model, bigger, tmp_path) is True


def test_block_measurement_runs_at_the_run_shapes():
    """The timing itself (the bf16 side; FP8 needs a GPU) runs every block kind at the run's shapes."""
    config = tiny_moe_config(layers="attn:moe,attn:mlp", n_layers=2)
    model = create_model(config)
    step = fp8_choice._block_step(model.blocks[0], False, False,
                                  torch.randn(config.batch_size, config.max_seq_len, config.d_model))
    step()
    assert all(p.grad is None for p in model.blocks[0].parameters())  # the copy's grads are reset


needs_fp8_grouped_mm = pytest.mark.skipif(
    not torch.cuda.is_available() or not detect_capabilities("cuda").supports_fp8_grouped_mm,
    reason="needs a GPU with FP8 grouped GEMMs (Hopper or later)")


@needs_fp8_grouped_mm
def test_fp8_expert_matmul_matches_bf16_forward_and_backward():
    torch.manual_seed(0)
    experts, d_in, d_out = 4, 256, 512
    counts = torch.tensor([64, 128, 32, 32], device="cuda")
    x = torch.randn(int(counts.sum()), d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(experts, d_out, d_in, device="cuda") * d_in ** -0.5).to(torch.bfloat16).requires_grad_()
    ref = expert_matmul(x, w, counts)
    out = fp8_expert_matmul(x, w, counts)
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.06, rel
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w), g)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    for a, b in ((gx, gx_ref), (gw, gw_ref)):
        assert (a.float() - b.float()).norm() / b.float().norm() < 0.08


@needs_fp8_grouped_mm
def test_fp8_measurement_on_the_gpu(tmp_path):
    config = tiny_moe_config(device="cuda", d_model=256, n_heads=4, max_seq_len=256, batch_size=8, use_fp8=None)
    model = create_model(config).cuda()
    times = fp8_choice.measure_blocks(model, config, torch.device("cuda"))
    assert times["bf16"] > 0 and times["fp8"] > 0
