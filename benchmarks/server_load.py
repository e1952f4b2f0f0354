"""The server under load: 1, 4 and 16 concurrent streaming clients on loopback, side by side.

    python benchmarks/server_load.py [--run RUN] [--requests 4] [--max-tokens 64] [--slots 16]

Starts `blueberry serve` on a free port (trains a small run first when --run is not given), then for each
concurrency level C runs C clients at once (aiohttp, on one event loop: client threads would take the
interpreter lock, and the cores, from the server they measure), each sending `--requests` streaming completions one after
another (sampled, temperature 0.8, distinct seeds; a stop string that never appears, so every request
yields exactly --max-tokens tokens unless it hits end-of-text). Reports requests/s, output tokens/s,
p50/p99 time to first token and total latency, errors, and where the first tokens' time went on average (the
server's /health: waiting for the engine process to read the request, in the engine, back to the server),
and the cores each side used meanwhile (CPU seconds over wall seconds, from /proc: Linux only).
The server process group is killed at the end; then,
for the same levels, the engine alone in this process (C such requests at once, `--requests` times, with the
server's thread count and --compile, for the same row counts): what the HTTP side costs, beside the batching the engine itself gets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_run(workdir: Path) -> Path:
    run = workdir / "run"
    subprocess.run([sys.executable, "train.py", "--config", "cpu", "--max-steps", "60", "--eval-every", "60",
                    "--no-compile", "--out-dir", str(run)], cwd=ROOT, check=True)
    return run


COLUMNS = ["clients", "requests", "req/s", "output tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 s",
           "latency p99 s", "errors", "first token ms: to engine / in it / back", "cores: server / engine / clients"]


def cpu_seconds(server_pid: int) -> list[float] | None:
    """CPU seconds so far of the server's process, of its children (the engine process) and of this one."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    try:
        children = [c for task in Path(f"/proc/{server_pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        return [of(server_pid), sum(of(c) for c in children), of("self")]
    except OSError:
        return None


def cores(before, after, wall: float) -> str:
    return "-" if before is None or after is None else " / ".join(f"{(b - a) / wall:.2f}" for a, b in zip(before, after))


def first_token(base: str) -> dict:
    import httpx

    return httpx.get(f"{base}/health", timeout=10).json().get("first_token") or {}


def first_token_path(before: dict, after: dict) -> str:
    """Mean ms of the requests' first tokens between two /health readings: reaching the engine, in it, back."""
    count = after.get("count", 0) - before.get("count", 0)
    if not count:
        return "-"
    return " / ".join(f"{(after[k] - before.get(k, 0)) / count * 1e3:.0f}" for k in ("to_engine_s", "in_engine_s", "back_s"))


async def one_client(http, base: str, requests: int, max_tokens: int, seed: int, results: list) -> None:
    for i in range(requests):
        body = {"model": "bench", "prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0.8,
                "seed": seed * 1000 + i, "stream": True, "stop": ["@@@@"]}
        start, first, tokens, ok = time.perf_counter(), None, 0, True
        try:
            async with http.post(f"{base}/v1/completions", json=body) as r:
                ok = r.status == 200
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if chunk["choices"][0].get("text"):
                            first = first or time.perf_counter()
                            tokens += 1
        except Exception:
            ok = False
        results.append({"ok": ok, "ttft": (first or time.perf_counter()) - start,
                        "latency": time.perf_counter() - start, "chunks": tokens})


async def clients(base: str, level: int, requests: int, max_tokens: int) -> tuple[list, float]:
    """`level` clients at once on one event loop (aiohttp: the clients' own CPU is small beside the
    server's, on the same machine); their results and the wall time."""
    import aiohttp

    results: list = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(http, base, requests, max_tokens, c, results) for c in range(level)))
        return results, time.perf_counter() - start


def engine_alone(run: str, levels: list[int], requests: int, max_tokens: int, slots: int, threads: int | None,
                 compile: bool) -> list[float]:
    """Output tokens/s of each level's number of such requests at once through one engine in this process,
    `requests` times."""
    from blueberry.inference.engine import Engine, SamplingParams, row_buckets
    from blueberry.inference.engine_worker import set_serving_threads
    from blueberry.runs.loading import load_model

    model, _, tokenizer, _ = load_model(run, device="cpu")
    set_serving_threads(threads, "cpu")  # as `blueberry serve` sets them
    engine = Engine(model, tokenizer, slots=slots, compile=compile, compile_rows=row_buckets(slots))
    engine.warm_up()  # compiled: every row count, as the server's engine process does
    ids = tokenizer.encode("ROMEO:")
    engine.generate([ids], SamplingParams(max_new_tokens=8, temperature=0.8, seed=0))  # warm-up
    rates = []
    for level in levels:
        start, tokens = time.perf_counter(), 0
        for i in range(requests):
            params = [SamplingParams(max_new_tokens=max_tokens, temperature=0.8, seed=c * 1000 + i,
                                     stop=("@@@@",)) for c in range(level)]
            tokens += sum(len(s.output_ids) for s in engine.generate([ids] * level, params))
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def wait_until_ready(base: str, server: subprocess.Popen, deadline: float) -> None:
    """Until the server's /health says 200; SystemExit if it exits first or the deadline passes."""
    import httpx

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited (code {server.returncode}) before it was ready")
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit("the server was not ready in time")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--serve-args", default="", help="more `blueberry serve` flags, e.g. '--compile' or '--threads 2'")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="blueberry-load-"))
    run = Path(args.run) if args.run else small_run(workdir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "blueberry", "serve", "--checkpoint", str(run), "--port",
                               str(port), "--slots", str(args.slots), "--model-name", "bench", *args.serve_args.split()], cwd=ROOT,
                              start_new_session=True)
    rows = []
    try:
        wait_until_ready(base, server, deadline=time.monotonic() + 1800)  # `--compile`: every row count first
        asyncio.run(clients(base, 1, 1, 8))  # warm-up
        for level in map(int, args.levels.split(",")):
            before, cpu_before = first_token(base), cpu_seconds(server.pid)
            results, wall = asyncio.run(clients(base, level, args.requests, args.max_tokens))
            path, used = first_token_path(before, first_token(base)), cores(cpu_before, cpu_seconds(server.pid), wall)
            good = [r for r in results if r["ok"]]
            rows.append([level, len(results), f"{len(good) / wall:.2f}",
                         f"{sum(r['chunks'] for r in good) / wall:,.0f}",
                         f"{percentile([r['ttft'] for r in good], 0.5) * 1000:.0f}",
                         f"{percentile([r['ttft'] for r in good], 0.99) * 1000:.0f}",
                         f"{percentile([r['latency'] for r in good], 0.5):.2f}",
                         f"{percentile([r['latency'] for r in good], 0.99):.2f}", len(results) - len(good), path, used])
            print(table(COLUMNS, rows[-1:]), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    print("\n" + table(COLUMNS, rows))
    base_rate = float(rows[0][3].replace(",", ""))
    print(f"aggregate tokens/s at {rows[-1][0]} clients = {float(rows[-1][3].replace(',', '')) / base_rate:.1f}x one client")
    threads = next((int(v) for k, v in zip(args.serve_args.split(), args.serve_args.split()[1:]) if k == "--threads"),
                   None)
    levels = list(map(int, args.levels.split(",")))
    alone = engine_alone(str(run), levels, args.requests, args.max_tokens, args.slots, threads,
                         "--compile" in args.serve_args.split())
    print("\n" + table(["requests at once", "engine alone tokens/s", "vs one"],
                       [[level, f"{rate:,.0f}", f"{rate / alone[0]:.1f}x"] for level, rate in zip(levels, alone)]))


if __name__ == "__main__":
    main()
