"""One name per thing: the package reads a run's settings by their sections (`config.optim.lr`), never by
the seed's flat spelling (`config.lr`), which stays for users' code. Checked where it matters, at run time:
every flat read made from inside the package (configs/ aside, where the spelling is defined) is recorded
while a run trains, resumes, scores its test split, and is loaded, quantized, generated from and exported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import blueberry
from blueberry.configs import adaptive_moe_config

PACKAGE = Path(blueberry.__file__).resolve().parent


@pytest.fixture
def flat_reads(monkeypatch):
    seen = []
    flat = adaptive_moe_config.AdaptiveMoEModelConfig.__getattr__

    def recording(self, name):
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        if caller.is_relative_to(PACKAGE) and not caller.is_relative_to(PACKAGE / "configs"):
            seen.append(f"{caller.relative_to(PACKAGE)}:{sys._getframe(1).f_lineno} config.{name}")
        return flat(self, name)

    monkeypatch.setattr(adaptive_moe_config.AdaptiveMoEModelConfig, "__getattr__", recording)
    return seen


@pytest.mark.parametrize("store", [False, True], ids=["in-memory", "token-store"])
def test_the_package_never_reads_a_config_by_its_flat_name(tiny, tmp_path, flat_reads, store):
    from blueberry.export import export_hf
    from blueberry.models.generation import generate_text
    from blueberry.ops.quantize import quantize_model
    from blueberry.runs.checkpoint import read_state, resolve_checkpoint
    from blueberry.runs.loading import load_model
    from blueberry.training import run_training

    config = tiny(test_fraction=0.1, token_store=store)
    run_training(config)
    checkpoint = resolve_checkpoint(config.out_dir)
    run_training(config.replace(max_steps=8), resume_state=read_state(checkpoint), resume_checkpoint=checkpoint)
    model, loaded, tokenizer, _ = load_model(config.out_dir, "cpu")
    with torch.no_grad():
        generate_text(quantize_model(model, "int8"), tokenizer, "the king", max_new_tokens=4, temperature=0)
    export_hf(load_model(config.out_dir, "cpu")[0], tokenizer, tmp_path / "hf")
    assert loaded.optim.lr == config.optim.lr  # the run's config came back whole
    assert not flat_reads, sorted(set(flat_reads))[:20]
