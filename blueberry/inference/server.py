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
and without a traceback); the server keeps serving after any bad request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from ..data.chat_template import ChatFormatError, chat_prompt_ids, chat_stop_strings
from .engine import ContextLengthError, Engine, SamplingParams

MAX_BODY_BYTES = 1 << 20


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
            except Exception as exc:  # a bug must not take the server down: fail the running requests
                for i, seq in enumerate(self.engine.slots):
                    if seq is not None:
                        seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
                        self.engine._release(i)

    def submit(self, prompt_ids, params, on_text):
        seq = self.engine.submit(prompt_ids, params, on_text)
        self.wake.set()
        return seq


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

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(error_body(f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error",
                                           code="request_too_large"), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        active = sum(s is not None for s in engine.slots)
        return {"status": "ok", "model": model_name, "active": active, "queued": len(engine.queue),
                "finished": dict(engine.finished_counts)}

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
        if body.top_k is not None and body.top_k <= 0:
            raise ApiError(400, "top_k must be positive", param="top_k", code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            engine.check(prompt_len, max_tokens)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="max_tokens" if prompt_len < engine.context else "prompt",
                           code="context_length_exceeded") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(body.temperature),
                              top_k=body.top_k, top_p=float(body.top_p) if body.top_p < 1 else None,
                              seed=body.seed, stop=tuple(stops) + tuple(extra_stop), stop_at_eot=not body.ignore_eos)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > len(engine.slots) * 4:
            raise ApiError(400, f"give 1 to {len(engine.slots) * 4} prompts", param="prompt", code="invalid_value")
        ids = [[tokenizer.eot_id] + tokenizer.encode(p) for p in prompts]
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
        seqs = [loop_thread.submit(i, p, None) for i, p in zip(ids, params)]
        try:
            while not all(s.done.is_set() for s in seqs):
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.005)
        finally:
            for s in seqs:
                if not s.done.is_set():
                    s.cancelled = True
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
        seq = loop_thread.submit(ids, params, lambda d: aio_loop.call_soon_threadsafe(queue.put_nowait, d))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

        def chunk(delta: dict, finish=None) -> str:
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": delta} if chat else {**delta, "logprobs": None})
            body = {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    delta = await asyncio.wait_for(queue.get(), timeout=0.05)
                    yield chunk(delta_of(delta))
                    continue
                except asyncio.TimeoutError:
                    pass
                if seq.done.is_set() and queue.empty():
                    break
                if await request.is_disconnected():
                    return
            if getattr(seq, "error", None):
                yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
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
                self.seq.cancelled = True  # the client went away: its slot is freed at the next step
            await self.body_iterator.aclose()


def _raise_if_failed(seqs) -> None:
    failed = [s for s in seqs if getattr(s, "error", None)]
    if failed:
        raise ApiError(500, "generation failed", "server_error")
