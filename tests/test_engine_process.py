"""`EngineProcess`, the engine in a process of its own that `blueberry serve` runs: the same tokens and text
as an `Engine` built in this process (greedy and seeded sampling, streamed pieces adding up to the text, the
first tokens' time accounted),
a load failure raised here as the loader raised it (and `blueberry serve` exiting on it with one line),
and a cancelled request ending as cancelled."""

from __future__ import annotations

import functools
import shutil
import time

import pytest

from blueberry.cli.use_cmds import served_model
from blueberry.errors import CheckpointError
from blueberry.inference import Engine
from blueberry.inference.engine import SamplingParams
from blueberry.inference.engine_process import EngineProcess
from blueberry.runs.checkpoint import resolve_run

from helpers import run_cli

PROMPTS = ["the king", "a night of", "she said", "and then the"]


def _params(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(max_new_tokens=24, temperature=0, stop_at_eot=False)
    return SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=100 + i, stop_at_eot=False)


def test_the_engine_process_answers_as_an_engine_here(served_run):
    load = functools.partial(served_model, str(served_run), "cpu", "fp32")
    model, tok = load()
    prompts = [tok.encode(p) for p in PROMPTS]
    here = Engine(model, tok, slots=2).generate(prompts, [_params(i) for i in range(len(prompts))])
    engine = EngineProcess(load, slots=2, threads=1)
    start = time.time()
    try:
        streamed = [[] for _ in prompts]
        there = [engine.submit(p, _params(i), on_text=streamed[i].append) for i, p in enumerate(prompts)]
        for seq in there:
            assert seq.done.wait(120), "the engine process did not answer"
        assert engine.context == Engine(model, tok, slots=1).context and engine.slot_count == 2
    finally:
        engine.close()
    assert not engine._process.is_alive()
    for a, b, pieces in zip(here, there, streamed):
        assert (b.output_ids, b.text, b.finish_reason, b.error) == (a.output_ids, a.text, a.finish_reason, None)
        assert "".join(pieces) == b.text and len(b.output_ids) == 24
    stats = engine.stats()
    first = stats.pop("first_token")
    assert stats == {"active": 0, "queued": 0, "finished": {"length": len(prompts)}}
    assert first["count"] == len(prompts) and first["in_engine_s"] > 0  # every first token, each a prefill
    assert 0 <= first["to_engine_s"] + first["in_engine_s"] + first["back_s"] <= len(prompts) * (time.time() - start)


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
