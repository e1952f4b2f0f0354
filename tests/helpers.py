"""Running the command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_FLAGS = ["--model-type", "moe", "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32",
              "--batch-size", "4", "--num-experts", "4", "--vocab-size", "300", "--eval-batches", "2", "--device", "cpu"]


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run_cli(*args, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blueberry", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=cwd or ROOT)


def popen_cli(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blueberry", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd or ROOT)


def run_in_group(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own; on timeout, or whatever happens, the whole group (torchrun
    and every rank it started) is killed, so that no orphan is left behind."""
    import signal

    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd[:6]))} ... did not finish in {timeout} s; its process "
                             f"group was killed. stderr tail:\n{err[-3000:]}") from None
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
