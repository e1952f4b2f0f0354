"""`blueberry serve` under requests that used to hurt it: a poisonous sampling value beside innocent
requests, a chunked body over the limit, empty stop strings, top-k 0, streams whose last piece could be
lost, hang-ups during non-streamed requests, an engine process killed mid-request; and `generate --top-k 0` on
the command line."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import ServedRun, run_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups as on Linux")


@pytest.fixture(scope="module")
def server(served_run):
    with ServedRun(served_run) as served:
        yield served.base


def complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server}/v1/completions", json={"model": "tiny", **body}, timeout=120)


def greedy_text(server, prompt: str, max_tokens: int, **extra) -> str:
    r = complete(server, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def streamed_text(server, body: dict) -> str:
    text = []
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": "tiny", "stream": True, **body},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
    return "".join(text)


POISONS = [{"temperature": 1e-39}, {"temperature": 5e-324}, {"temperature": 1e-30, "top_p": 1e-9},
           {"temperature": 5, "top_k": 1}, {"temperature": 1e-39, "top_k": 0, "top_p": 1}]


def test_a_poisonous_request_fails_nobody_else(server):
    prompts = ["the king", "the queen", "the night"]
    alone = [greedy_text(server, p, 120, ignore_eos=True) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        innocent = [pool.submit(greedy_text, server, p, 120, ignore_eos=True) for p in prompts]
        time.sleep(0.2)  # the innocent ones are in flight
        poisons = [pool.submit(complete, server, prompt="the king", max_tokens=40, ignore_eos=True, **p)
                   for p in POISONS]
        streamed = pool.submit(streamed_text, server, {"prompt": "the king", "max_tokens": 40, "temperature": 1e-39,
                                                      "ignore_eos": True})
        assert [f.result() for f in innocent] == alone
        answers = [f.result() for f in poisons]
    greedy = greedy_text(server, "the king", 40, ignore_eos=True)
    for p, r in zip(POISONS, answers):
        assert r.status_code in (200, 400), (p, r.text)
        if r.status_code == 200 and (p["temperature"] < 1e-20 or p.get("top_k") == 1):
            assert r.json()["choices"][0]["text"] == greedy, p  # these are greedy in the limit
    assert streamed.result() == greedy
    assert httpx.get(f"{server}/health").json()["finished"].get("error", 0) == 0


def test_a_chunked_body_over_the_limit_is_refused(server):
    piece = b" " * (64 << 10)

    def body():
        yield b'{"model": "tiny", "prompt": "the", "max_tokens": 2, "padding": "'
        for _ in range(128):  # 8 MiB, sent without a Content-Length
            yield piece
        yield b'"}'

    r = httpx.post(f"{server}/v1/completions", content=body(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"]["code"] == "request_too_large"
    small = iter([b'{"model": "tiny", ', b'"prompt": "the", "max_tokens": 2}'])  # chunked, under the limit
    r = httpx.post(f"{server}/v1/completions", content=small, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


@pytest.mark.parametrize("body,status", [
    ({"stop": [""]}, 400), ({"stop": ""}, 400), ({"stop": ["x"] * 17}, 400), ({"stop": ["y" * 257]}, 400),
    ({"stop": ["y" * 256]}, 200), ({"top_k": -1}, 400),
    ({"seed": 1 << 64}, 400), ({"seed": -(1 << 70)}, 400), ({"seed": -1}, 200), ({"seed": (1 << 64) - 1}, 200),
    ({"top_k": 0}, 200), ({"top_k": 0, "temperature": 1.0, "seed": 1}, 200), ({"top_p": 1e-9}, 200),
])
def test_edge_parameters(server, body, status):
    r = complete(server, prompt="the", max_tokens=4, **body)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["code"] == "invalid_value"


def test_unknown_routes_answer_in_openai_shape(server):
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_streamed_text_is_always_the_whole_text(server):
    prompts = ["the king", "the queen of", "fire", "the night and the", "love war peace"]
    for attempt in range(6):
        for n, prompt in enumerate(prompts):
            max_tokens = 1 + (attempt * 7 + n * 3) % 30
            whole = greedy_text(server, prompt, max_tokens)
            assert streamed_text(server, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}) == whole


def test_a_client_that_hangs_up_on_a_plain_request_cancels_it(server):
    before = httpx.get(f"{server}/health").json()["finished"].get("cancelled", 0)
    with pytest.raises(httpx.ReadTimeout):
        complete_slow = {"model": "tiny", "prompt": "the", "max_tokens": 500, "ignore_eos": True, "temperature": 1.0}
        httpx.post(f"{server}/v1/completions", json=complete_slow, timeout=httpx.Timeout(60, read=0.3))
    deadline = time.time() + 20
    while (health := httpx.get(f"{server}/health").json())["finished"].get("cancelled", 0) == before:
        assert time.time() < deadline, health
        time.sleep(0.05)
    assert health["active"] == 0


def test_generate_with_top_k_zero(served_run):
    r = run_cli("generate", "--checkpoint", served_run, "--prompt", "the king", "--max-new-tokens", "8",
                "--top-k", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the king")
    r = run_cli("generate", "--checkpoint", served_run, "--prompt", "the", "--max-new-tokens", "4", "--top-k", "-1")
    assert r.returncode == 2 and "--top-k" in r.stderr


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "the \\ud800 king", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "the", "stop": ["\\udfff"], "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
])
def test_unpaired_surrogates_are_refused(server, path, body):
    r = httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text


def _engine_pid(server_pid: int) -> int:
    """The engine process `blueberry serve` spawned (not multiprocessing's resource tracker)."""
    children = [c for task in Path(f"/proc/{server_pid}/task").iterdir() for c in (task / "children").read_text().split()]
    for child in children:
        if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
            return int(child)
    raise AssertionError("no engine process")


def test_a_killed_engine_fails_its_requests_alone_and_is_started_again(served_run):
    import os
    import signal

    with ServedRun(served_run, slots=2) as served:
        before = greedy_text(served.base, "the king", 30, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = {"prompt": "the", "max_tokens": 480, "temperature": 1.0, "ignore_eos": True}
            plain = pool.submit(complete, served.base, **long)
            events = []

            def stream_events():
                with httpx.stream("POST", f"{served.base}/v1/completions", timeout=120,
                                  json={"model": "tiny", "stream": True, **long}) as r:
                    events.extend(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))

            streaming = pool.submit(stream_events)
            deadline = time.time() + 30
            while sum(httpx.get(f"{served.base}/health").json()[k] for k in ("active", "queued")) < 2:
                assert time.time() < deadline and not plain.done(), "the requests never reached the engine"
                time.sleep(0.05)
            os.kill(_engine_pid(served.pid), signal.SIGKILL)
            r = plain.result(timeout=60)
            streaming.result(timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        assert "engine process stopped" in r.json()["error"]["message"]
        assert events and events[-1]["error"]["code"] == "engine_unavailable", events[-1:]
        deadline = time.time() + 120
        while (again := complete(served.base, prompt="the king", max_tokens=30, temperature=0,
                                 ignore_eos=True)).status_code == 503:
            assert time.time() < deadline, "the engine did not come back"
            time.sleep(0.2)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == before
        assert "the engine process stopped (exit code -9)" in served.stderr()
