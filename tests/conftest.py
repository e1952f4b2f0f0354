"""Shared fixtures: a small local corpus and tiny configs so that every test runs in seconds."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

# The test machine has no network: tell Hugging Face libraries before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blueberry.configs import AdaptiveMoEModelConfig  # noqa: E402

WORDS = ("the king queen sword crown night day love war peace river stone fire wind shadow light "
         "speak hear see walk run fall rise sing weep laugh dream wake sleep gold silver iron").split()


def make_text(rng: random.Random, n_lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Twelve .txt documents of random word salad (about 60 KB)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(make_text(rng, 120), encoding="utf-8")
    return d


def tiny_config(tmp_path: Path, corpus: Path, **overrides) -> AdaptiveMoEModelConfig:
    base = dict(dataset=str(corpus), model_type="moe", d_model=32, n_layers=2, n_heads=4, max_seq_len=32, batch_size=4,
                num_experts=4, vocab_size=300, max_steps=6, eval_every=3, eval_batches=2, checkpoint_every=3,
                cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), device="cpu",
                sample_tokens=4, momentum_warmup_steps=3, warmup_steps=1)
    base.update(overrides)
    return AdaptiveMoEModelConfig(**base).validate()


@pytest.fixture
def tiny(tmp_path, corpus_dir):
    return lambda **kw: tiny_config(tmp_path, corpus_dir, **kw)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def served_run(corpus_dir, tmp_path_factory) -> Path:
    """One tiny trained run (window 512) shared by the server tests."""
    from helpers import train_served_run

    return train_served_run(corpus_dir, tmp_path_factory.mktemp("served"))


# The fast tier (`make test-fast`): modules of unit tests that start no process and train no run beyond a
# few in-process steps. Every other module is end-to-end and marked slow; `make test` runs both.
FAST_MODULES = {"test_configs", "test_cross_entropy", "test_data", "test_fast_encode", "test_inference_safety",
                "test_models", "test_ops", "test_optimizers", "test_plan", "test_step_efficiency",
                "test_structure", "test_system", "test_activation_checkpointing", "test_logs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
