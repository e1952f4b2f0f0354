"""`blueberry serve` started as a user would, on a free loopback port, spoken to over HTTP by the official
`openai` client and by httpx: answers, streams, errors, 16 concurrent clients, disconnects. The server
process is always killed with its whole process group."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import httpx
import pytest

from helpers import ServedRun, run_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups as on Linux")


@pytest.fixture(scope="module")
def trained_run(served_run):
    return served_run


@pytest.fixture(scope="module")
def server(trained_run):
    with ServedRun(trained_run) as served:
        yield served.base


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert set(health["first_token"]) == {"count", "to_engine_s", "in_engine_s", "back_s"}


def test_completion_streamed_equals_not_streamed_and_the_cli(client, trained_run):
    whole = client.completions.create(model="tiny", prompt="the king", max_tokens=24, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    pieces = client.completions.create(model="tiny", prompt="the king", max_tokens=24, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in pieces)
    assert streamed == whole.choices[0].text
    cli = run_cli("generate", "--checkpoint", trained_run, "--prompt", "the king", "--max-new-tokens", "24",
                  "--temperature", "0")
    assert cli.stdout[:-1] == "the king" + whole.choices[0].text


def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "speak of the night"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize("body,status,code", [
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "word " * 2000, "max_tokens": 4}, 400, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 422, "invalid_value"),
    ({"model": "tiny"}, 422, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "n": 3}, 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, code):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and "Traceback" not in r.text
    ok = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_oversized_body_and_bad_messages(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)})
    r = httpx.post(f"{server}/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": 1}]})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_sixteen_concurrent_streaming_clients(server, client):
    prompts = [f"the {w}" for w in "king queen sword crown night day love war peace river stone fire wind "
                                   "shadow light gold".split()]

    def ask(prompt):
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0).choices[0].text
             for p in prompts[:4]]
    assert together[:4] == alone  # a request's answer does not depend on what it was batched with


def test_a_client_that_disconnects_stops_its_generation(server):
    # 500 tokens, end-of-text ignored: the generation cannot end by itself before the hang-up is noticed.
    # Ten hang-ups: one that lands while the server is inside `send` was missed about one time in twenty.
    body = {"model": "tiny", "prompt": "the", "max_tokens": 500, "temperature": 1.0, "stream": True,
            "stop": ["@@never@@"], "ignore_eos": True}
    for attempt in range(10):
        before = httpx.get(f"{server}/health").json()["finished"]
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the first token arrived: hang up
        deadline = time.time() + 20
        while (after := httpx.get(f"{server}/health").json()["finished"]) == before:
            assert time.time() < deadline, f"hang-up {attempt}: the generation was neither cancelled nor finished"
            time.sleep(0.02)
        assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, f"hang-up {attempt}: {before} -> {after}"
