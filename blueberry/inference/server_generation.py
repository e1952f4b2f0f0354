"""Requests from the server's event loop go to an engine runner: `EngineLoop` (an `Engine` on a thread of
this process) or `engine_process.EngineProcess` (an engine in a process of its own, what `blueberry serve`
runs). Both offer `submit`, `cancel`, `check`, `stats`, `close` and the `tokenizer`, `context` and
`slot_count` served. `generate_all` awaits a whole answer on the futures resolved when each request ends;
`stream` answers with server-sent events fed by a queue the runner fills. Either way a client's hang-up,
awaited as its `http.disconnect`, cancels its generation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine import Engine, SamplingParams, Sequence
from .server_errors import ApiError, error_body

_END = object()  # the end of a stream's text, posted by the runner after its last piece


class EngineLoop:
    """Runs an engine on a thread of this process; requests come in from the server's event loop. (Its
    Python shares this process's interpreter lock with the event loop: `EngineProcess` does not.)"""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer, self.context, self.slot_count = engine.tokenizer, engine.context, len(engine.slots)
        self.unavailable = None  # as EngineProcess's: an engine on a thread is always there
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="blueberry-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if not self.engine.has_work():
                self.wake.wait(0.5)  # woken by `submit`; the timeout only lets `stopping` be seen
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # the shared forward failed: fail the requests in it, serve the next ones
                self.engine.fail_active(f"{type(exc).__name__}: {exc}")

    def submit(self, prompt_ids, params, on_text=None, on_done=None) -> Sequence:
        seq = self.engine.submit(prompt_ids, params, on_text, on_done)
        self.wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        Engine.cancel(seq)

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        self.engine.check(prompt_len, max_new_tokens)

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        self.stopping = True


async def client_gone(request: Request) -> None:
    """Return when the client hangs up: its body has been read, so the next ASGI message is the disconnect
    (a server that cannot say any more counts as one)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass


def _settle(future: asyncio.Future, seq: Sequence) -> None:
    if not future.done():  # cancelled meanwhile: the client is gone
        future.set_result(seq)


async def generate_all(loop, request: Request, ids: list[list[int]],
                       params: list[SamplingParams]) -> list[Sequence]:
    """Generate every prompt, until the last one ends or the client hangs up (which cancels them all)."""
    aio_loop = asyncio.get_running_loop()
    futures = [aio_loop.create_future() for _ in ids]
    seqs = [loop.submit(i, p, on_done=lambda s, f=f: aio_loop.call_soon_threadsafe(_settle, f, s))
            for i, p, f in zip(ids, params, futures)]
    finished, gone = asyncio.gather(*futures), asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        gone.cancel()
        for s in seqs:
            if not s.done.is_set():
                loop.cancel(s)
    raise_if_failed(seqs)
    return seqs


@dataclass
class _Chunks:
    """The server-sent events of one streamed answer (OpenAI's chunk shapes, completion or chat)."""
    id: str
    model: str
    chat: bool

    def event(self, delta: dict, finish=None) -> str:
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": delta} if self.chat else {**delta, "logprobs": None})
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    def text(self, piece: str) -> str:
        return self.event({"content": piece} if self.chat else {"text": piece})


def stream(loop, request: Request, ids: list[int], params: SamplingParams, model: str,
           chat: bool) -> StreamingResponse:
    """Start generating `ids` and answer with its text as server-sent events, ending with `data: [DONE]`."""
    aio_loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    seq = loop.submit(ids, params, lambda d: aio_loop.call_soon_threadsafe(queue.put_nowait, d),
                      lambda _s: aio_loop.call_soon_threadsafe(queue.put_nowait, _END))
    if seq.done.is_set() and seq.error_kind == "unavailable":  # it never reached an engine: a status, not a stream
        raise_if_failed([seq])
    chunks = _Chunks(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", model, chat)
    return _GenerationStream(_events(request, queue, seq, chunks), seq, loop, media_type="text/event-stream")


async def _events(request: Request, queue: asyncio.Queue, seq: Sequence, chunks: _Chunks):
    if chunks.chat:
        yield chunks.event({"role": "assistant", "content": ""})
    async with contextlib.aclosing(_pieces(request, queue)) as batches:
        async for batch in batches:  # the events of all the pieces waiting, sent in one write
            events = "".join(chunks.text(piece) for piece in batch if piece is not _END)
            if events:
                yield events
            if batch[-1] is _END:
                break
        else:
            return  # the client hung up
    if getattr(seq, "error", None):
        yield f"data: {json.dumps(failure_body(seq))}\n\n"
    else:
        yield chunks.event({} if chunks.chat else {"text": ""}, finish=seq.finish_reason)
    yield "data: [DONE]\n\n"


class _GenerationStream(StreamingResponse):
    """A streamed answer that cancels its generation however the stream ends. A hang-up cancels the
    sending task wherever it is; when that is inside `send` rather than inside the event generator, the
    generator's own `finally` would wait for garbage collection, and the generation would run on."""

    def __init__(self, content, seq, loop, **kwargs):
        super().__init__(content, **kwargs)
        self.seq, self.loop = seq, loop

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.seq.done.is_set():
                self.loop.cancel(self.seq)  # the client went away: its slot is freed at the next step
            await self.body_iterator.aclose()


async def _pieces(request: Request, queue: asyncio.Queue):
    """The items the runner posts to `queue`, in order, as lists of those waiting together, until
    `_END` (the last item of the last list); stops early, without it, when the client hangs up. One
    pending `get` is kept across waits, so none is lost."""
    getter, gone = asyncio.ensure_future(queue.get()), asyncio.ensure_future(client_gone(request))
    try:
        while True:
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                return  # the client hung up
            batch = [getter.result()]
            while batch[-1] is not _END and not queue.empty():  # what else the engine posted meanwhile
                batch.append(queue.get_nowait())
            yield batch
            if batch[-1] is _END:
                return
            getter = asyncio.ensure_future(queue.get())
    finally:
        getter.cancel()
        gone.cancel()


def failure_body(seq: Sequence) -> dict:
    if seq.error_kind == "request":
        return error_body(f"this request's sampling parameters failed: {seq.error}", "invalid_request_error",
                          code="invalid_value")
    if seq.error_kind == "unavailable":  # the engine process stopped or is starting again: worth a retry
        return error_body(f"{seq.error}; retry the request", "server_error", code="engine_unavailable")
    return error_body("generation failed", "server_error")


def raise_if_failed(seqs: list[Sequence]) -> None:
    failed = [s for s in seqs if getattr(s, "error", None)]
    if any(s.error_kind == "request" for s in failed):
        raise ApiError(400, failure_body(next(s for s in failed if s.error_kind == "request"))["error"]["message"],
                       code="invalid_value")
    if failed:
        kind = "unavailable" if any(s.error_kind == "unavailable" for s in failed) else "internal"
        body = failure_body(next(s for s in failed if s.error_kind == kind))["error"]
        raise ApiError(503 if kind == "unavailable" else 500, body["message"], "server_error", code=body["code"])
