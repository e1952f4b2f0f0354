"""A soak of `blueberry serve`: many requests from many client threads, with hang-ups and bad requests mixed in.

    python benchmarks/server_soak.py --run RUN [--requests 2000] [--clients 16] [--seconds 900]

Starts the server on a free loopback port (or talks to `--url`, with `--pid` for its memory), learns the
greedy text of a few prompts sent alone, then sends `--requests` requests from `--clients` threads: greedy
ones (streamed or not) whose text must equal the text sent alone, streams hung up after their first
piece, and invalid requests that must get a 4xx. Afterwards `/health` must show no request still in a
slot or queued, and the server's resident memory must not have grown more than `--max-rss-growth` since
the warm-up. Prints a report; exits 1 when a check fails. The server's process group is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the king", "the queen of the", "fire and wind", "night", "the sword of", "love and war",
           "the river runs", "gold silver iron"]
MAX_TOKENS = (1, 8, 24)
BAD_BODIES = [
    {"model": "tiny", "prompt": "x", "max_tokens": 0}, {"model": "tiny", "prompt": "x", "temperature": -1},
    {"model": "tiny", "prompt": "x", "top_p": 0}, {"model": "tiny", "prompt": "x", "top_k": -2},
    {"model": "tiny", "prompt": "x", "stop": [""]}, {"model": "tiny", "prompt": "x", "max_tokens": 10**9},
    {"model": "tiny", "prompt": "x", "n": 2}, {"model": "tiny", "prompt": 5}, {"model": "tiny"},
    {"model": "tiny", "prompt": "x", "temperature": "hot"}, {"prompt": "x"}, {"model": "nope", "prompt": "x"},
]


@dataclass
class SoakReport:
    sent: Counter = field(default_factory=Counter)  # requests by kind
    failures: list = field(default_factory=list)  # one line per check that failed
    seconds: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    health: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        growth = (self.rss_end_mb / self.rss_warm_mb - 1) * 100 if self.rss_warm_mb else 0.0
        return [f"requests: {sum(self.sent.values())} in {self.seconds:.1f} s ({dict(self.sent)})",
                f"server memory: {self.rss_warm_mb:.1f} MB after warm-up, {self.rss_end_mb:.1f} MB at the end "
                f"({growth:+.1f}%)", f"health afterwards: {self.health}",
                f"failures: {len(self.failures)}", *(f"  {f}" for f in self.failures[:20])]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (from /proc; 0 where there is none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def greedy_body(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def ask(http: httpx.Client, body: dict) -> tuple[int, str]:
    """(status, text) of a completion, streamed or not; a stream's error event counts as status 500."""
    if not body.get("stream"):
        r = http.post("/v1/completions", json=body)
        return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)
    text = []
    with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, line
                text.append(event["choices"][0]["text"])
    return 200, "".join(text)


def hang_up(http: httpx.Client, rng: random.Random) -> None:
    """A long stream, abandoned after its first piece of text."""
    body = {"model": "tiny", "prompt": rng.choice(PROMPTS), "max_tokens": 200, "temperature": 0.8,
            "seed": rng.randrange(1 << 30), "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break


def references(base: str) -> dict:
    """The greedy text of every (prompt, max_tokens) sent alone, one at a time."""
    with httpx.Client(base_url=base, timeout=120) as http:
        return {(p, n): ask(http, greedy_body(p, n))[1] for p in PROMPTS for n in MAX_TOKENS}


def one_request(http: httpx.Client, rng: random.Random, expected: dict, rates: tuple[float, float]) -> tuple[str, str | None]:
    """Send one random request; (its kind, a failure line or None)."""
    draw = rng.random()
    if draw < rates[0]:
        hang_up(http, rng)
        return "hang-up", None
    if draw < rates[0] + rates[1]:
        body = rng.choice(BAD_BODIES)
        r = http.post("/v1/completions", json=body)
        ok = 400 <= r.status_code < 500 and "error" in r.json()
        return "bad", None if ok else f"bad request {body} got {r.status_code}: {r.text[:200]}"
    prompt, n, stream = rng.choice(PROMPTS), rng.choice(MAX_TOKENS), rng.random() < 0.5
    status, text = ask(http, greedy_body(prompt, n, stream))
    if status != 200 or text != expected[(prompt, n)]:
        return "greedy", f"greedy {prompt!r} max_tokens={n} stream={stream}: {status} {text[:120]!r} " \
                         f"(alone: {expected[(prompt, n)][:120]!r})"
    return "greedy", None


def wait_idle(base: str, seconds: float = 60) -> dict:
    """/health once no request is in a slot or queued (or when `seconds` have passed)."""
    deadline = time.time() + seconds
    while True:
        health = httpx.get(f"{base}/health", timeout=30).json()
        if (health["active"] == 0 and health["queued"] == 0) or time.time() > deadline:
            return health
        time.sleep(0.1)


def soak(base: str, pid: int, requests: int = 2000, clients: int = 16, seconds: float = 900, seed: int = 0,
         hang_up_rate: float = 0.1, bad_rate: float = 0.1, max_rss_growth: float = 0.10) -> SoakReport:
    """Run the soak against a served run at `base` (process `pid`); the report says what failed."""
    report, lock, start = SoakReport(), threading.Lock(), time.monotonic()
    expected = references(base)
    tickets = iter(range(requests))
    warm_at = max(1, requests // 10)

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=base, timeout=120) as http:
            while time.monotonic() - start < seconds:
                with lock:
                    ticket = next(tickets, None)
                if ticket is None:
                    return
                if ticket == warm_at:
                    report.rss_warm_mb = rss_mb(pid)
                try:
                    kind, failure = one_request(http, rng, expected, (hang_up_rate, bad_rate))
                except httpx.HTTPError as exc:
                    kind, failure = "transport", f"{type(exc).__name__}: {exc}"
                with lock:
                    report.sent[kind] += 1
                    if failure:
                        report.failures.append(failure)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.monotonic() - start
    report.health = wait_idle(base)
    report.rss_end_mb = rss_mb(pid)
    check(report, requests, max_rss_growth)
    return report


def check(report: SoakReport, requests: int, max_rss_growth: float) -> None:
    if sum(report.sent.values()) < requests:
        report.failures.append(f"only {sum(report.sent.values())} of {requests} requests were sent in time")
    if report.health.get("active") or report.health.get("queued"):
        report.failures.append(f"requests left in the engine: {report.health}")
    if report.health.get("finished", {}).get("error"):
        report.failures.append(f"generations failed: {report.health['finished']}")
    if report.rss_warm_mb and report.rss_end_mb > report.rss_warm_mb * (1 + max_rss_growth):
        report.failures.append(f"server memory grew from {report.rss_warm_mb:.1f} to {report.rss_end_mb:.1f} MB")


def serve(run: str, slots: int) -> tuple[subprocess.Popen, str]:
    """`blueberry serve` on a free port in its own process group; (process, base URL) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "blueberry", "serve", "--checkpoint", run, "--port", str(port),
                             "--slots", str(slots), "--model-name", "tiny"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile())
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"the server did not start (exit status {proc.poll()})")


def stop(proc: subprocess.Popen) -> None:
    try:
        import os

        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="the run to serve (a run directory or checkpoint)")
    p.add_argument("--url", help="soak a server already running here instead (with --pid)")
    p.add_argument("--pid", type=int, default=0, help="the running server's process id, for its memory")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=900, help="stop sending after this long")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.run and not args.url:
        p.error("give --run, or --url (and --pid)")
    proc, base, pid = None, args.url, args.pid
    if args.run:
        proc, base = serve(args.run, args.slots)
        pid = proc.pid
    try:
        report = soak(base, pid, args.requests, args.clients, args.seconds, args.seed,
                      max_rss_growth=args.max_rss_growth)
    finally:
        if proc is not None:
            stop(proc)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
