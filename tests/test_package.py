"""The package as a user installs it: `python -m build` makes a wheel; the wheel installs into a fresh
virtual environment with the core dependencies only (the exact versions of constraints.txt, from the local
pip cache or the registry), and there `blueberry --help` and a 5-step dev run work, FastAPI and lm-eval are
absent, and a command that needs an extra says which one (exit 2). Every process runs in its own process
group, killed whole on timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from helpers import ROOT, run_in_group

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="venv layout as on Linux")]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the built wheel and its core dependencies; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("package")
    r = run_in_group([sys.executable, "-m", "build", "--wheel", "--outdir", root / "dist", ROOT], timeout=600,
                     env=_env(), cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (wheel,) = (root / "dist").glob("blueberry-*.whl")
    r = run_in_group([sys.executable, "-m", "venv", root / "venv"], timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    bin_dir = root / "venv" / "bin"
    r = run_in_group([bin_dir / "python", "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", wheel],
                     timeout=900, env=_env(), cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return bin_dir


def test_wheel_declares_ranges_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert all(">=" in d and "<" in d for d in project["dependencies"]), project["dependencies"]
    assert {"serve", "eval", "data", "fp8"} <= set(project["optional-dependencies"])
    core = " ".join(project["dependencies"])
    assert "fastapi" not in core and "lm-eval" not in core


def test_core_install_runs_help_and_a_dev_run(installed, tmp_path, corpus_dir):
    r = run_in_group([installed / "blueberry", "--help"], timeout=120, env=_env(), cwd=tmp_path)
    assert r.returncode == 0 and "generate" in r.stdout, r.stderr
    r = run_in_group([installed / "python", "-c", "import importlib.util as u; "
                      "print([m for m in ('fastapi', 'lm_eval', 'uvicorn', 'datasets') if u.find_spec(m)])"],
                     timeout=60, env=_env(), cwd=tmp_path)
    assert r.stdout.strip() == "[]", r.stdout  # the core install brings none of the extras
    r = run_in_group([installed / "blueberry", "--config", "dev", "--dataset", corpus_dir, "--max-steps", "5",
                      "--eval-every", "5", "--eval-tasks", "none", "--no-compile", "--device", "cpu",
                      "--out-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache"],
                     timeout=600, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").exists()
    r = run_in_group([installed / "blueberry", "serve", "--checkpoint", tmp_path / "run"], timeout=120,
                     env=_env(), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "blueberry[serve]" in r.stderr and "Traceback" not in r.stderr
