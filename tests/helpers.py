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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_served_run(corpus_dir, root: Path) -> Path:
    """A tiny run with a window of 512 tokens (room for a generation long enough to hang up during)."""
    flags = list(TINY_FLAGS)
    flags[flags.index("--seq-len") + 1] = "512"
    r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / "run", "--max-steps", "30",
                "--eval-every", "30", "--no-compile", *flags)
    assert r.returncode == 0, r.stderr
    return root / "run"


class ServedRun:
    """`blueberry serve` on a free loopback port, in a process group of its own, killed whole on exit.
    `base` is its URL; `pid` its process id."""

    def __init__(self, run_dir, slots: int = 8, model_name: str = "tiny", start_timeout: float = 120):
        self.run_dir, self.slots, self.model_name, self.start_timeout = run_dir, slots, model_name, start_timeout

    def __enter__(self) -> "ServedRun":
        import signal
        import time

        import httpx

        import tempfile

        port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
        self.proc = subprocess.Popen([sys.executable, "-m", "blueberry", "serve", "--checkpoint", str(self.run_dir),
                                      "--port", str(port), "--slots", str(self.slots), "--model-name", self.model_name],
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=cli_env(),
                                     cwd=ROOT, start_new_session=True)
        self.pid, self.base = self.proc.pid, f"http://127.0.0.1:{port}"
        deadline = time.time() + self.start_timeout
        try:
            while True:
                assert self.proc.poll() is None, self.stderr()
                try:
                    if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "server did not start"
                time.sleep(0.2)
        except BaseException:
            _kill_group(self.pid, signal.SIGKILL)
            raise

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc) -> None:
        import signal

        _kill_group(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


def load_while_marked(marker: str, run: str):
    """An engine process's loader (see `cli.use_cmds.served_model`) that fails while the file `marker` is missing."""
    from blueberry.cli.use_cmds import served_model

    if not Path(marker).exists():
        raise RuntimeError(f"{marker} is missing")
    return served_model(run, "cpu", "fp32")
