"""`--dry-run` prints the plan and trains nothing; every GPU preset fits the hardware it is named for by
the memory estimate (on its own GPU count, FSDP2-sharded where the preset says so)."""

from __future__ import annotations

import pytest

from blueberry.configs import get_config
from blueberry.configs.presets import PRESET_HARDWARE
from blueberry.training.plan import describe_plan
from helpers import run_cli


@pytest.mark.parametrize("preset", sorted(PRESET_HARDWARE))
def test_each_gpu_preset_fits_its_hardware(preset):
    lines = describe_plan(get_config(preset, device="cpu", use_fp8=False), preset=preset)
    (verdict,) = [line for line in lines if line.strip().startswith("hardware")]
    assert "fits by the estimate" in verdict and "NOT" not in verdict, "\n".join(lines)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    r = run_cli("--config", "dev", "--dry-run", "--out-dir", tmp_path / "run", "--max-steps", "7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("parameters", "tokens per step", "7 steps", "memory/device", "checkpointing none", "optimizer"):
        assert word in r.stdout, r.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_expert_parallelism_divides_the_experts_and_fsdp2_the_rest():
    """The estimate counts what each device holds: the production MoE's experts once per `--expert-parallel`
    share (outside FSDP2's shards), every other parameter once per FSDP2 rank; the plan says so."""
    import torch

    from blueberry.models import create_model
    from blueberry.models.moe import MixtureOfExperts
    from blueberry.training.memory import estimate

    config = get_config("production", device="cpu", use_fp8=False)
    with torch.device("meta"):
        model = create_model(config)
    experts = sum(getattr(m, n).numel() for m in model.modules() if isinstance(m, MixtureOfExperts)
                  for n in ("w_up", "w_down"))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < experts < total
    plain = estimate(model, config, world_size=8)
    ep = estimate(model, config.replace(expert_parallel=4), world_size=8)
    assert plain["weights"] == pytest.approx(total * 4 / 8)
    assert ep["weights"] == pytest.approx(experts * 4 / 4 + (total - experts) * 4 / 8)
    lines = describe_plan(config.replace(expert_parallel=4), preset="production")
    (memory,) = [line for line in lines if "memory/device" in line]
    assert "sharded by FSDP2" in memory and "experts split 4 ways" in memory, memory
