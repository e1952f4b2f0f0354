"""`EngineProcess`, the engine in a process of its own that `blueberry serve` runs: the same tokens and text
as an `Engine` built in this process (greedy and seeded sampling, streamed pieces adding up to the text, the
first tokens' time accounted; compiled too),
a load failure raised here as the loader raised it (and `blueberry serve` exiting on it with one line), a
cancelled request ending as cancelled, and a dead engine started again (retried while it cannot be, refusing
requests meanwhile; closing while it loads ends everything)."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import time

import pytest

from blueberry.cli.use_cmds import served_model
from blueberry.errors import CheckpointError
from blueberry.inference import Engine
from blueberry.inference.engine import SamplingParams
from blueberry.inference.engine_process import EngineProcess
from blueberry.runs.checkpoint import resolve_run

from helpers import load_while_marked, run_cli

PROMPTS = ["the king", "a night of", "she said", "and then the"]


def _params(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(max_new_tokens=24, temperature=0, stop_at_eot=False)
    return SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=100 + i, stop_at_eot=False)


def test_the_engine_process_answers_as_an_engine_here(served_run):
    load = functools.partial(served_model, str(served_run), "cpu", "fp32")
    model, tok = load()
    prompts = [tok.encode(p) for p in PROMPTS]
    here = Engine(model, tok, slots=1).generate(prompts, [_params(i) for i in range(len(prompts))])
    engine = EngineProcess(load, slots=1, threads=1)  # one slot each: the same rows, so the same arithmetic
    try:
        streamed = [[] for _ in prompts]
        there = [engine.submit(p, _params(i), on_text=streamed[i].append) for i, p in enumerate(prompts)]
        for seq in there:
            assert seq.done.wait(120), "the engine process did not answer"
        assert engine.context == Engine(model, tok, slots=1).context and engine.slot_count == 1
    finally:
        engine.close()
    assert not engine._process.is_alive()
    for a, b, pieces in zip(here, there, streamed):
        assert (b.output_ids, b.text, b.finish_reason, b.error) == (a.output_ids, a.text, a.finish_reason, None)
        assert "".join(pieces) == b.text and len(b.output_ids) == 24
    stats = engine.stats()
    first = stats.pop("first_token")
    assert stats == {"active": 0, "queued": 0, "finished": {"length": len(prompts)}}
    assert first["count"] == len(prompts) and first["in_engine_s"] > 0  # every first text, each after a prefill
    assert min(first["to_engine_s"], first["back_s"]) >= 0


@pytest.mark.slow
def test_a_compiled_engine_process_answers_as_an_eager_engine_here(served_run):
    """`serve --compile`: the engine process compiles its step for each row count before it is ready (a
    server's buckets, here 1 and 2) without falling back to eager, then gives the eager engine's greedy
    tokens."""
    load = functools.partial(served_model, str(served_run), "cpu", "fp32")
    model, tok = load()
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_at_eot=False)
    here = Engine(model, tok, slots=2).generate(prompts, params)
    engine = EngineProcess(load, slots=2, compile=True, threads=1)
    try:
        assert engine.compile_failure is None
        there = [engine.submit(p, params) for p in prompts]
        for seq in there:
            assert seq.done.wait(300), "the engine process did not answer"
    finally:
        engine.close()
    assert [s.output_ids for s in there] == [s.output_ids for s in here]
    assert all(s.finish_reason == "length" and s.error is None for s in there)


def test_a_cancelled_request_ends_as_cancelled(served_run):
    engine = EngineProcess(functools.partial(served_model, str(served_run), "cpu", "fp32"), slots=1, threads=1)
    try:
        pieces = []
        seq = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=400, temperature=0, stop_at_eot=False),
                            on_text=pieces.append)
        queued = engine.submit([4, 5], SamplingParams(max_new_tokens=400, temperature=0, stop_at_eot=False))
        engine.cancel(queued)  # before it reaches a slot
        engine.cancel(seq)
        assert seq.done.wait(60) and queued.done.wait(60)
        assert (seq.finish_reason, queued.finish_reason) == ("cancelled", "cancelled")
        assert len(seq.output_ids) < 400 and queued.output_ids == []
        after = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0, stop_at_eot=False))
        assert after.done.wait(60) and after.finish_reason == "length"  # the slot was freed
    finally:
        engine.close()


def test_a_load_failure_is_raised_here_and_serve_exits_with_one_line(served_run, tmp_path):
    bad = tmp_path / "damaged"
    shutil.copytree(served_run, bad)
    weights = resolve_run(bad) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        EngineProcess(functools.partial(served_model, str(bad), "cpu", "fp32"), slots=1)
    r = run_cli("serve", "--checkpoint", bad, "--port", "1", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "damaged or truncated" in r.stderr


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.1)


def test_an_engine_that_cannot_start_again_is_retried_and_refuses_requests_meanwhile(served_run, tmp_path):
    marker = tmp_path / "loadable"
    marker.touch()
    engine = EngineProcess(functools.partial(load_while_marked, str(marker), str(served_run)), slots=1, threads=1)
    params = SamplingParams(max_new_tokens=3, temperature=0, stop_at_eot=False)
    try:
        marker.unlink()
        os.kill(engine._process.pid, signal.SIGKILL)
        _wait_for(lambda: "could not be started again" in (engine.unavailable or ""), 120, "no failed restart")
        refused = engine.submit([1, 2, 3], params)
        assert refused.done.is_set() and refused.error_kind == "unavailable" and "is missing" in refused.error
        marker.touch()
        _wait_for(lambda: engine.unavailable is None, 120, "the engine did not come back")
        served = engine.submit([1, 2, 3], params)
        assert served.done.wait(60) and served.finish_reason == "length" and len(served.output_ids) == 3
    finally:
        engine.close()
    assert not engine._process.is_alive()


def test_closing_while_the_engine_starts_again_ends_everything(served_run):
    engine = EngineProcess(functools.partial(served_model, str(served_run), "cpu", "fp32"), slots=1, threads=1)
    waiting = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=200, temperature=0, stop_at_eot=False))
    os.kill(engine._process.pid, signal.SIGKILL)
    _wait_for(lambda: engine.unavailable is not None, 30, "the death went unnoticed")
    start = time.time()
    engine.close()  # while the new one loads
    assert time.time() - start < 15 and not engine._process.is_alive()
    assert waiting.done.is_set() and waiting.error_kind == "unavailable"
    late = engine.submit([1, 2], SamplingParams(max_new_tokens=2))
    assert late.done.is_set() and "stopping" in late.error
