"""What a bad request gets from the server: `ApiError`, the exception handlers that turn every failure
into OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`, a 4xx status; a 500 only for
a bug, without a traceback), and the `BodyLimit` middleware that answers 413 to a body over the limit
on the bytes actually received, whatever the framing (Content-Length or chunked)."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_models import ErrorInfo, ErrorResponse

MAX_BODY_BYTES = 1 << 20
_DRAIN_BYTES = 16 * MAX_BODY_BYTES  # an oversized body is read (and dropped) up to this, so the client sees the 413


class ApiError(Exception):
    """A refused request: raised anywhere in a handler, answered with `status` and the error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "the request body is not valid JSON", code="invalid_json")
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _error(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error ({type(exc).__name__})", "server_error")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return _error(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answered as OpenAI's error JSON, and bodies over `MAX_BODY_BYTES` refused."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)


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
