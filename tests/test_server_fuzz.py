"""Property-based fuzzing of `blueberry serve` over HTTP: cases drawn by schemathesis from the server's own
OpenAPI schema (`/openapi.json`), valid and invalid, then hand-made JSON bodies with boundary and huge
numbers, wrong types, unicode, empty strings and malformed framing. No answer may be a 5xx, every error
must be OpenAI's JSON shape, and the server must still serve normally afterwards. Bounded in time."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import httpx
import pytest

from helpers import ServedRun

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups as on Linux")

SCHEMA_SECONDS, RAW_SECONDS = 40.0, 35.0
EXTREMES = [0, -1, 1, 2, 5, 6, 2**31, -2**31, 2**63, 10**30, -10**30, 0.0, -0.0, 1e-39, 5e-324, 1e-9, 0.999999,
            1.0000001, 1e308, -1e308, 4.9, 5.0000001]
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n", "ignore_eos"]


@pytest.fixture(scope="module")
def server(served_run):
    with ServedRun(served_run) as served:
        yield served.base


def check_answer(r, what) -> None:
    assert r.status_code < 500, f"{r.status_code} for {what}: {r.text[:500]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"], r.text[:300]


def leaves():
    return st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                     st.sampled_from(EXTREMES), st.just(""))


def values():
    return st.one_of(leaves(), st.lists(leaves(), max_size=4), st.dictionaries(st.text(max_size=6), leaves(), max_size=3))


def completion_bodies():
    prompt = st.one_of(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=5), values())
    optional = {f: values() for f in FIELDS}
    optional["max_tokens"] = st.one_of(st.integers(-3, 24), values())
    return st.fixed_dictionaries({"model": st.one_of(st.just("tiny"), values()), "prompt": prompt}, optional=optional)


def chat_bodies():
    role = st.one_of(st.sampled_from(["system", "user", "assistant"]), values())
    message = st.one_of(st.fixed_dictionaries({"role": role, "content": st.one_of(st.text(max_size=40), values())}),
                        values())
    optional = {f: values() for f in FIELDS}
    optional["max_tokens"] = st.one_of(st.integers(-3, 24), values())
    return st.fixed_dictionaries({"model": st.one_of(st.just("tiny"), values()),
                                  "messages": st.one_of(st.lists(message, max_size=5), values())}, optional=optional)


def raw_payloads():
    """(path, bytes) pairs: JSON with the literals Python accepts (NaN, Infinity), deep nesting, broken
    encodings, not-JSON, or an ordinary body from the strategies above."""
    bodies = st.one_of(st.tuples(st.just("/v1/completions"), completion_bodies()),
                       st.tuples(st.just("/v1/chat/completions"), chat_bodies()))
    encoded = bodies.map(lambda pb: (pb[0], json.dumps(pb[1]).encode()))
    weird = st.sampled_from([
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}', b'{"model": "tiny", "prompt": "x", "top_p": Infinity}',
        b'{"model": "tiny", "prompt": "x", "max_tokens": -Infinity}', b"[" * 50000 + b"]" * 50000,
        b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe\x00garbage", b"", b"null",
        b"[]", b'"a string"', b"{", b'{"model": "tiny", "prompt": "\\ud800"}', b'{"model": "tiny", "messages": [{}]}'])
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
    return st.one_of(encoded, encoded, st.tuples(paths, weird), st.tuples(paths, st.binary(max_size=64)))


class TimeUp(Exception):
    """The fuzzing budget is spent: ends hypothesis's loop (caught by `until_time_up`)."""


def until_time_up(test) -> None:
    try:
        test()
    except TimeUp:
        pass


FUZZ_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck),
                     phases=[Phase.explicit, Phase.generate], print_blob=True)


def fuzz_schema_cases(server: str, seconds: float, counts: Counter) -> None:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    posts = [op for op in operations if op.method.upper() == "POST"]
    assert len(posts) == 2 and len(operations) == 4, [op.path for op in operations]
    strategies = [op.as_strategy(mode) for op in operations + posts * 3 for mode in schemathesis.GenerationMode]
    start = time.monotonic()

    @settings(max_examples=3000, **FUZZ_SETTINGS)
    @given(case=st.one_of(strategies), as_served=st.booleans())
    def one(case, as_served):
        if time.monotonic() - start > seconds:
            raise TimeUp
        if as_served and isinstance(case.body, dict):
            case.body["model"] = "tiny"  # past the model check, into the sampling options
        r = case.call(base_url=server, timeout=120)
        counts[r.status_code] += 1
        check_answer(r, f"{case.method} {case.path} {case.body!r:.300}")

    until_time_up(one)


def fuzz_raw_bodies(server: str, seconds: float, counts: Counter) -> None:
    start = time.monotonic()
    with httpx.Client(base_url=server, timeout=120) as http:
        @settings(max_examples=3000, **FUZZ_SETTINGS)
        @given(payload=raw_payloads())
        def one(payload):
            if time.monotonic() - start > seconds:
                raise TimeUp
            path, data = payload
            try:
                r = http.post(path, content=data, headers={"content-type": "application/json"})
            except httpx.TransportError as exc:
                raise AssertionError(f"{type(exc).__name__} {exc} for POST {path} {data[:300]!r}") from None
            counts[r.status_code] += 1
            check_answer(r, f"POST {path} {data[:300]!r}")

        until_time_up(one)


def test_no_request_gets_a_5xx_and_the_server_serves_on(server):
    schema_counts, raw_counts = Counter(), Counter()
    fuzz_schema_cases(server, SCHEMA_SECONDS, schema_counts)
    fuzz_raw_bodies(server, RAW_SECONDS, raw_counts)
    print(f"schema cases by status: {dict(schema_counts)}; hand-made bodies: {dict(raw_counts)}")
    assert sum(schema_counts.values()) >= 50 and sum(raw_counts.values()) >= 50  # fewer on a loaded machine
    assert any(code == 200 for code in schema_counts | raw_counts)
    deadline = time.time() + 60
    while (health := httpx.get(f"{server}/health").json())["active"] or health["queued"]:
        assert time.time() < deadline, health  # every fuzzed request let go of its slot
        time.sleep(0.1)
    assert health["status"] == "ok" and health["finished"].get("error", 0) == 0
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "the king", "max_tokens": 8},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
