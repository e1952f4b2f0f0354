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
