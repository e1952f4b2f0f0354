"""Activation checkpointing (training/activation_checkpointing.py): losses and gradients equal to the run
without it for every mixer and feed-forward (fp32, fresh random weights and tokens, dropout and router noise
on so that the recomputation must replay the random numbers), under torch.compile too; state dicts keep
their names; the memory estimate counts it and the run picks the least that fits; a given value is kept."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.models import create_model
from blueberry.training import memory
from blueberry.training.activation_checkpointing import apply_activation_checkpointing
from helpers import TINY_FLAGS, run_cli

LAYERS = ["attn:mlp", "attn:moe", "mamba:mlp", "retention:mlp", "attn:moe,mod(attn:moe)", "mamba,attn:mlp"]


def tiny(layers: str, **kw):
    base = dict(layers=layers, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, batch_size=2, num_experts=4,
                vocab_size=300, device="cpu", use_fp8=False, use_amp=False, compile=False, dropout=0.1,
                router_noise=0.1, capacity_factor=1.25, ssm_head_dim=16, ssm_state=8, scan_chunk=8)
    base.update(kw)
    return AdaptiveMoEModelConfig(**base).validate()


def loss_and_grads(model, idx, seed=0):
    torch.manual_seed(seed)  # the same dropout masks and router noise for every variant
    out = model(idx, idx)
    loss = out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_the_same_loss_and_gradients(layers, mode):
    torch.manual_seed(1)
    config = tiny(layers)
    plain = create_model(config).train()
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain), mode)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    ref_loss, ref_grads = loss_and_grads(plain, idx)
    loss, grads = loss_and_grads(wrapped, idx)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    names = {n.replace("_checkpoint_wrapped_module.", "") for n in grads}
    assert names == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name.replace("_checkpoint_wrapped_module.", "")], rtol=0, atol=1e-6,
                                   msg=name)


def test_checkpointing_under_compile_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(2)
    config = tiny("attn:moe", dropout=0.0, router_noise=0.0)
    plain = create_model(config).train()
    wrapped = torch.compile(apply_activation_checkpointing(copy.deepcopy(plain), "selective"))
    idx = torch.randint(0, config.vocab_size, (2, 16))
    ref_loss, ref_grads = loss_and_grads(plain, idx)
    loss, grads = loss_and_grads(wrapped, idx)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        key = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(g, ref_grads[key], rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_names_are_unchanged():
    config = tiny("attn:moe")
    plain = create_model(config)
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain), "full")
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    fresh = apply_activation_checkpointing(create_model(config), "selective")
    fresh.load_state_dict(plain.state_dict())
    for (name, a), b in zip(plain.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_estimate_counts_checkpointing_and_the_least_that_fits_is_chosen(monkeypatch):
    config = tiny("attn:moe,attn:mlp", n_layers=4, d_model=64, batch_size=8, max_seq_len=64)
    model = create_model(config)
    sizes = {m: memory.estimate(model, config, checkpointing=m) for m in ("none", "selective", "full")}
    assert sizes["none"]["activations"] > sizes["selective"]["activations"] > sizes["full"]["activations"]
    device = torch.device("cpu")
    between = (sizes["none"]["total"] + sizes["selective"]["total"]) / 2
    monkeypatch.setattr(memory, "available_bytes", lambda d: between)
    assert memory.choose_checkpointing(model, config, device) == "selective"
    monkeypatch.setattr(memory, "available_bytes", lambda d: sizes["none"]["total"] * 2)
    assert memory.choose_checkpointing(model, config, device) == "none"
    monkeypatch.setattr(memory, "available_bytes", lambda d: (sizes["full"]["total"] + sizes["selective"]["total"]) / 2)
    assert memory.choose_checkpointing(model, config, device) == "full"


def test_flag_trains_and_is_recorded(corpus_dir, tmp_path):
    r = run_cli("--dataset", corpus_dir, "--cache-dir", tmp_path / "cache", "--out-dir", tmp_path / "run",
                "--max-steps", "3", "--eval-every", "3", "--no-compile", "--eval-tasks", "none",
                "--activation-checkpointing", "selective", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["activation_checkpointing"] == "selective"
    assert "checkpointing selective" in r.stdout
    bad = run_cli("--activation-checkpointing", "some", "--config", "dev")
    assert bad.returncode == 2 and "--activation-checkpointing" in bad.stderr


def test_selective_keeps_the_matmul_outputs_and_recomputes_the_rest():
    """The policy sees overloads (aten.mm.default): each matmul is saved, the cheap ops between are not."""
    from torch.utils.checkpoint import CheckpointPolicy

    from blueberry.training.activation_checkpointing import _keep_matmuls

    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        assert _keep_matmuls(None, op) == CheckpointPolicy.MUST_SAVE, op
    for op in (aten.relu.default, aten.mul.Tensor, aten.native_layer_norm.default):
        assert _keep_matmuls(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op
