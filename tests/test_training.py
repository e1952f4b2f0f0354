import json
import math
from pathlib import Path

import pytest
import torch

from blueberry.data import create_dataloaders, load_and_cache_data
from blueberry.errors import RunError
from blueberry.models import create_model
from blueberry.runs.checkpoint import read_state, resolve_checkpoint
from blueberry.training import evaluate_model, run_training, train_model
from blueberry.runs.layout import read_metrics



def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


@pytest.mark.parametrize("accum,model_type", [(1, "moe"), (2, "standard")])
def test_resume_is_bitwise_identical(tiny, tmp_path, accum, model_type):
    cfg = tiny(max_steps=8, checkpoint_every=4, eval_every=4, keep_checkpoints=5, grad_accum_steps=accum,
               model_type=model_type, router_noise=0.1 if model_type == "moe" else 0.0, dropout=0.1)
    run_training(cfg)
    straight = train_losses(cfg.out_dir)
    ckpt = resolve_checkpoint(Path(cfg.out_dir) / "checkpoints" / "step_000004")
    state = read_state(ckpt)
    resumed_cfg = cfg.replace(out_dir=str(tmp_path / "resumed"))
    run_training(resumed_cfg, resume_state=state, resume_checkpoint=ckpt)
    resumed = train_losses(resumed_cfg.out_dir)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]  # bitwise


def test_run_produces_every_artefact(tiny):
    cfg = tiny(max_steps=6)
    model, metrics = run_training(cfg)
    run = Path(cfg.out_dir)
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "expert_load.png", "samples.txt",
                 "tokenizer.json", "summary.json", "checkpoints/latest", "checkpoints/best/model.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens_per_sec", "mfu", "expert_load"):
        assert key in metrics, key
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-6)
    state = torch.load(run / "checkpoints" / "step_000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["data"]["position"] > 0
    assert json.loads((run / "config.json").read_text())["d_model"] == 32
    assert "===== step 6 =====" in (run / "samples.txt").read_text()
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    for key in ("max_expert_load", "dropped_fraction", "router_z_loss", "load_balancing_loss"):
        assert all(math.isfinite(r[key]) for r in train), key  # the MoE figures computed each step are logged


def test_keep_last_k_checkpoints(tiny):
    cfg = tiny(max_steps=8, checkpoint_every=2, eval_every=100, keep_checkpoints=2)
    run_training(cfg)
    steps = sorted(p.name for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*"))
    assert steps == ["step_000006", "step_000008"]


def _setup(cfg):
    _, tok, corpus = load_and_cache_data(cfg)
    model = create_model(cfg)
    train, val = create_dataloaders(cfg, corpus)
    return model, train, val, corpus


def test_nonfinite_gradient_is_skipped(tiny):
    cfg = tiny(max_steps=5, eval_every=100, checkpoint_every=100)
    model, train, val, corpus = _setup(cfg)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == 2 else grad

    model.blocks[0].attn.q_proj.weight.register_hook(poison)
    _, metrics = train_model(model, train, val, cfg, token_bytes=corpus.token_bytes, progress=False)
    assert metrics["skipped_steps"] == 1 and metrics["step"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nonfinite_stops_with_checkpoint(tiny):
    cfg = tiny(max_steps=50, eval_every=100, checkpoint_every=100, max_nonfinite_steps=3)
    model, train, val, corpus = _setup(cfg)
    model.blocks[0].attn.q_proj.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(RunError, match="3 consecutive"):
        train_model(model, train, val, cfg, token_bytes=corpus.token_bytes, progress=False)
    assert resolve_checkpoint(cfg.out_dir).name == "step_000003"


def test_evaluate_model_bits_per_byte(tiny):
    cfg = tiny()
    model, _, val, corpus = _setup(cfg)
    result = evaluate_model(model, val, cfg, token_bytes=corpus.token_bytes)
    # bits per byte = nats per token / ln 2 * tokens per byte over the evaluated targets
    targets = torch.cat([b[1].reshape(-1) for b in val])
    n_bytes = corpus.token_bytes[targets.numpy()].sum()
    assert math.isclose(result["bits_per_byte"], result["loss"] * result["tokens"] / math.log(2) / n_bytes,
                        rel_tol=1e-9)
    assert 0 <= result["accuracy"] <= 1 and len(result["expert_load"]) == cfg.n_layers


def test_lr_sweep_writes_table_and_plot(tiny, tmp_path):
    from blueberry.training.sweep import run_lr_sweep

    cfg = tiny(max_steps=3, eval_every=3, out_dir=str(tmp_path / "sweep"))
    results = run_lr_sweep(cfg, [0.01, 0.03])
    assert [r["lr"] for r in results] == [0.01, 0.03]
    root = tmp_path / "sweep"
    assert (root / "sweep.png").exists() and "**best**" in (root / "sweep.md").read_text()
    assert (root / "lr_0.01" / "checkpoints").exists() and (root / "lr_0.03" / "checkpoints").exists()
    # same seed and data: the first step's loss is identical across the sweep
    assert train_losses(root / "lr_0.01")[1] == train_losses(root / "lr_0.03")[1]


def test_compiled_run_trains_evaluates_and_checkpoints(tiny):
    cfg = tiny(max_steps=4, eval_every=2, checkpoint_every=2, compile=True)
    model, metrics = run_training(cfg)
    assert metrics["step"] == 4 and math.isfinite(metrics["loss"])
    state = read_state(resolve_checkpoint(cfg.out_dir))
    assert state["step"] == 4
    from blueberry.runs.checkpoint import load_weights

    load_weights(resolve_checkpoint(cfg.out_dir), create_model(cfg))  # plain names, no _orig_mod prefix


def test_seed_style_api(tiny, tmp_path, monkeypatch):
    """The seed's README calls: load data, build loaders, create_model, train_model with four arguments."""
    from blueberry.data import create_dataloaders, load_and_cache_data
    from blueberry.models import create_model
    from blueberry.training import evaluate_model, train_model

    monkeypatch.chdir(tmp_path)
    config = tiny(out_dir=None, max_steps=2, eval_every=2, checkpoint_every=2)
    texts, tokenizer, tokens = load_and_cache_data(config)
    train_loader, val_loader = create_dataloaders(config, tokens)
    model = create_model(config, "moe")
    model, metrics = train_model(model, train_loader, val_loader, config)
    assert metrics["step"] == 2 and (tmp_path / config.out_dir / "checkpoints").exists()
    result = evaluate_model(model, val_loader, config)
    assert {"loss", "accuracy", "perplexity", "tokens_per_sec"} <= set(result)
