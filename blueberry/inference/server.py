"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn, started by `blueberry serve`).

  POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                               "seed", "stream", "ignore_eos" (vLLM's extension)}
  POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...the same options}
  GET  /v1/models             the one model served
  GET  /health                {"status": "ok", ...}

One engine thread runs `Engine.step()` while there is work: a request joins the running batch at the
next step and leaves it when finished (continuous batching); a client that disconnects cancels its
request. Streaming answers are server-sent events ending with `data: [DONE]`. Every error is OpenAI's
JSON shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status (a 500 only for a bug,
and without a traceback); the server keeps serving after any bad request. A body over 1 MiB is refused
(413) on the bytes actually received, whatever the framing (Content-Length or chunked). A request that
fails inside the engine fails alone; one whose own sampling parameters failed gets a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.chat_template import ChatFormatError, chat_prompt_ids, chat_stop_strings
from .engine import ContextLengthError, Engine, SamplingParams

MAX_BODY_BYTES = 1 << 20
MAX_STOPS = 16
MAX_STOP_CHARS = 256  # each stop string is searched for at every token: a bounded cost per request
_DRAIN_BYTES = 16 * MAX_BODY_BYTES  # an oversized body is read (and dropped) up to this, so the client sees the 413
_END = object()  # the end of a stream's text, posted by the engine thread after its last piece


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[StrictInt] = None
    temperature: Union[StrictFloat, StrictInt] = 1.0
    top_p: Union[StrictFloat, StrictInt] = 1.0
    top_k: Optional[StrictInt] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    n: StrictInt = 1
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens whatever the end-of-text


class CompletionRequest(_Options):
    prompt: Union[str, list[str]]
    max_tokens: Optional[StrictInt] = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1)


class EngineLoop:
    """Runs the engine on its own thread; requests come in from the server's event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="blueberry-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if not self.engine.has_work():
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # the shared forward failed: fail the requests in it, serve the next ones
                self.engine.fail_active(f"{type(exc).__name__}: {exc}")

    def submit(self, prompt_ids, params, on_text=None, on_done=None):
        seq = self.engine.submit(prompt_ids, params, on_text, on_done)
        self.wake.set()
        return seq


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes, however it is framed (Content-Length or
    chunked), is answered 413 before any handler parses it. The body is read here, counted as it comes,
    and handed on whole."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more, last = [], 0, True, None
        while more:
            last = await receive()
            if last["type"] != "http.request":
                break  # the client left: let the app see it
            body = last.get("body", b"")
            size += len(body)
            more = last.get("more_body", False)
            if size > self.limit:
                await self._drain(receive, size, more)
                return await _send_json(send, 413, error_body(f"request body over {self.limit} bytes",
                                                              "invalid_request_error", code="request_too_large"))
            chunks.append(body)
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replay = [whole if last["type"] == "http.request" else last]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    @staticmethod
    async def _drain(receive, size: int, more: bool) -> None:
        """Read the rest of an oversized body (up to a bound), so that the client, still sending, reads
        the 413 rather than a reset connection."""
        while more and size < _DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(engine: Engine, model_name: str) -> FastAPI:
    app = FastAPI(title="Blueberry", docs_url=None, redoc_url=None)
    loop_thread = EngineLoop(engine)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("the request body is not valid JSON", "invalid_request_error",
                                           code="invalid_json"), status_code=400)
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid value')}",
                                       "invalid_request_error", param=param, code="invalid_value"),
                            status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "blueberry"}]}

    def sampling(body: _Options, prompt_len: int, default_max: int, extra_stop=()) -> SamplingParams:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
        max_tokens = default_max if body.max_tokens is None else body.max_tokens
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if not 0 <= body.temperature <= 5:
            raise ApiError(400, "temperature must be in [0, 5]", param="temperature", code="invalid_value")
        if not 0 < body.top_p <= 1:
            raise ApiError(400, "top_p must be in (0, 1]", param="top_p", code="invalid_value")
        if body.seed is not None and not -(1 << 63) <= body.seed < 1 << 64:
            raise ApiError(400, "seed must be a 64-bit integer", param="seed", code="invalid_value")
        if body.top_k is not None and body.top_k < 0:
            raise ApiError(400, "top_k must be 0 (no cut-off) or positive", param="top_k", code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        _check_text(stops, "stop")
        if len(stops) > MAX_STOPS or not all(stops) or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                           "characters", param="stop",
                           code="invalid_value")
        try:
            engine.check(prompt_len, max_tokens)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="max_tokens" if prompt_len < engine.context else "prompt",
                           code="context_length_exceeded") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(body.temperature),
                              top_k=body.top_k or None, top_p=float(body.top_p) if body.top_p < 1 else None,
                              seed=body.seed, stop=tuple(stops) + tuple(extra_stop), stop_at_eot=not body.ignore_eos)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        _check_text(prompts, "prompt")
        if not prompts or len(prompts) > len(engine.slots) * 4:
            raise ApiError(400, f"give 1 to {len(engine.slots) * 4} prompts", param="prompt", code="invalid_value")
        ids = [[tokenizer.prefix_id] + tokenizer.encode(p) for p in prompts]
        params = [sampling(body, len(i), 16) for i in ids]
        if body.stream:
            if len(ids) != 1:
                raise ApiError(400, "stream with one prompt at a time", param="prompt", code="invalid_value")
            return _stream(request, ids[0], params[0], "text_completion", lambda d: {"text": d})
        seqs = await _run_all(request, ids, params)
        choices = [{"index": i, "text": s.text, "finish_reason": s.finish_reason, "logprobs": None}
                   for i, s in enumerate(seqs)]
        return _response("text_completion", choices, ids, seqs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        try:
            _check_text([m.content for m in body.messages], "messages")
            ids = chat_prompt_ids([m.model_dump() for m in body.messages], tokenizer)
        except ChatFormatError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_value") from None
        params = sampling(body, len(ids), max(1, engine.context - len(ids)), chat_stop_strings(tokenizer))
        if body.stream:
            return _stream(request, ids, params, "chat.completion.chunk", lambda d: {"content": d}, chat=True)
        (seq,) = await _run_all(request, [ids], [params])
        choices = [{"index": 0, "message": {"role": "assistant", "content": seq.text},
                    "finish_reason": seq.finish_reason}]
        return _response("chat.completion", choices, [ids], [seq])

    async def _run_all(request: Request, ids, params):
        """Generate every prompt; woken by the engine thread when the last one ends, and looking for a
        hang-up (which cancels them all) in between."""
        aio_loop, all_done, left = asyncio.get_running_loop(), asyncio.Event(), [len(ids)]

        def one_done():
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

        seqs = [loop_thread.submit(i, p, on_done=lambda _s: aio_loop.call_soon_threadsafe(one_done))
                for i, p in zip(ids, params)]
        try:
            while not all_done.is_set():
                try:
                    await asyncio.wait_for(all_done.wait(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
        finally:
            for s in seqs:
                if not s.done.is_set():
                    engine.cancel(s)
        _raise_if_failed(seqs)
        return seqs

    def _response(kind, choices, ids, seqs):
        prompt_tokens = sum(len(i) for i in ids)
        completion_tokens = sum(len(s.output_ids) for s in seqs)
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _stream(request: Request, ids, params, kind, delta_of, chat=False):
        aio_loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = loop_thread.submit(ids, params, lambda d: aio_loop.call_soon_threadsafe(queue.put_nowait, d),
                                 lambda _s: aio_loop.call_soon_threadsafe(queue.put_nowait, _END))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

        def chunk(delta: dict, finish=None) -> str:
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": delta} if chat else {**delta, "logprobs": None})
            body = {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async with contextlib.aclosing(_pieces(request, queue)) as pieces:
                async for delta in pieces:
                    if delta is _END:
                        break
                    yield chunk(delta_of(delta))
                else:
                    return  # the client hung up
            if getattr(seq, "error", None):
                yield f"data: {json.dumps(_failure_body(seq))}\n\n"
            else:
                yield chunk({} if chat else {"text": ""}, finish=seq.finish_reason)
            yield "data: [DONE]\n\n"

        return _GenerationStream(events(), seq, media_type="text/event-stream")

    app.state.engine_loop = loop_thread
    return app


class _GenerationStream(StreamingResponse):
    """A streamed answer that cancels its generation however the stream ends. A hang-up cancels the
    sending task wherever it is; when that is inside `send` rather than inside the event generator, the
    generator's own `finally` would wait for garbage collection, and the generation would run on."""

    def __init__(self, content, seq, **kwargs):
        super().__init__(content, **kwargs)
        self.seq = seq

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.seq.done.is_set():
                Engine.cancel(self.seq)  # the client went away: its slot is freed at the next step
            await self.body_iterator.aclose()


async def _pieces(request: Request, queue: asyncio.Queue):
    """The items the engine thread posts to `queue`, in order, until `_END` (yielded last); stops early,
    without it, when the client hangs up. One pending `get` is kept across waits, so none is lost."""
    getter = asyncio.ensure_future(queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if not done:
                if await request.is_disconnected():
                    return
                continue
            item = getter.result()
            yield item
            if item is _END:
                return
            getter = asyncio.ensure_future(queue.get())
    finally:
        getter.cancel()


def _check_text(texts, param: str) -> None:
    """Refuse strings that are not Unicode text (lone surrogates, which JSON's escapes can spell)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{param} holds an unpaired surrogate (\\ud800-\\udfff): not valid Unicode text",
                           param=param, code="invalid_value") from None


def _failure_body(seq) -> dict:
    if seq.error_kind == "request":
        return error_body(f"this request's sampling parameters failed: {seq.error}", "invalid_request_error",
                          code="invalid_value")
    return error_body("generation failed", "server_error")


def _raise_if_failed(seqs) -> None:
    failed = [s for s in seqs if getattr(s, "error", None)]
    if any(s.error_kind == "request" for s in failed):
        raise ApiError(400, _failure_body(next(s for s in failed if s.error_kind == "request"))["error"]["message"],
                       code="invalid_value")
    if failed:
        raise ApiError(500, "generation failed", "server_error")
