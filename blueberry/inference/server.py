"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn, started by `blueberry serve`).

  POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                               "seed", "stream", "ignore_eos" (vLLM's extension)}
  POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...the same options}
  GET  /v1/models             the one model served
  GET  /health                {"status": "ok", ...}

The engine runs `Engine.step()` while there is work, in a process of its own under `blueberry serve`
(`EngineProcess`) or on a thread beside the event loop (`EngineLoop`, for an `Engine` built in this
process): a request joins the running batch at the next step and leaves it when finished (continuous
batching); a client that disconnects cancels its request. Streaming answers are server-sent events ending
with `data: [DONE]`. While an engine process is being started again, requests and /health get 503
`engine_unavailable`. Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status (a 500 only for a bug,
and without a traceback); the server keeps serving after any bad request. A body over 1 MiB is refused
(413) on the bytes actually received, whatever the framing (Content-Length or chunked). A request that
fails inside the engine fails alone; one whose own sampling parameters failed gets a 400.

This module assembles the app; the parts live beside it: `api_models` (request, answer and error
models), `server_routes` (one handler per route, over `ServerState`), `server_generation` (the engine
thread, awaiting and streaming answers, cancelling on hang-up), `engine_process` and `engine_worker` (the
engine's own process) and `server_errors` (error JSON, the body limit).
"""

from __future__ import annotations

from fastapi import FastAPI

from .engine import Engine
from .engine_process import EngineProcess
from .server_errors import MAX_BODY_BYTES, ApiError, BodyLimit, error_body, install_error_handlers
from .server_generation import EngineLoop
from .server_routes import ServerState, router

__all__ = ["ApiError", "BodyLimit", "EngineLoop", "EngineProcess", "MAX_BODY_BYTES", "ServerState", "create_app",
           "error_body"]


def create_app(engine: Engine | EngineProcess, model_name: str) -> FastAPI:
    """The server for `engine` (an `Engine` gets its thread now), answering as model `model_name`; stop the
    engine with `app.state.engine_loop.close()`."""
    app = FastAPI(title="Blueberry", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(router)
    loop = EngineLoop(engine) if isinstance(engine, Engine) else engine
    app.state.server = ServerState(loop, model_name)
    app.state.engine_loop = loop
    return app
