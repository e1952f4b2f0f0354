"""The engine process's side of `engine_process.EngineProcess`: load the model, build the engine, then loop:
read the requests and cancellations the server sent, run a step, send back each request's new text and
its end. One message per half step (after the prefills, after the decode), so that a new request's first
token is not held back behind everyone's next token. `set_serving_threads`: the engine's intra-op threads.

Messages, server to engine: ("submit", id, prompt_ids, SamplingParams), ("cancel", id), ("stop",).
Engine to server: ("ready", tokenizer, context, compile_failure) or ("failed", exception) once, then
("events", [("text", id, piece) | ("first", id, read_at) | ("done", id, finish_reason, error, error_kind,
output_ids)], stats, sent_at):
"first" comes before a request's first text, with the time the engine read the request, and `sent_at` is when
the message was sent (`time.monotonic()`, one clock for the machine's processes): the server can tell where a
first text's time went.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import torch

from ..system import detect_capabilities
from .engine import Engine, Sequence, row_buckets


def set_serving_threads(requested: int | None, device_type: str) -> None:
    """torch's intra-op threads for a served engine: `requested`, else (unless OMP_NUM_THREADS is set) the
    device's `serving_threads()`, never more than torch has."""
    if requested:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ and (threads := detect_capabilities(device_type).serving_threads()):
        torch.set_num_threads(min(threads, torch.get_num_threads()))


def serve_engine(conn, load: Callable, slots: int, compile: bool, threads: int | None) -> None:
    """The engine process's main: `load()` gives (model, tokenizer); serve requests from `conn` until the
    server says stop or goes away."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole group: the server stops us
        signal.signal(stop_signal, signal.SIG_IGN)
    try:
        model, tokenizer = load()
        set_serving_threads(threads, next(model.parameters()).device.type)
        engine = Engine(model, tokenizer, slots=slots, compile=compile, compile_rows=row_buckets(slots))
        engine.warm_up()  # compiled: every row count now, not while the first requests wait
    except BaseException as exc:  # the server shows the error and exits (a bad checkpoint, no memory)
        conn.send(("failed", _picklable(exc)))
        return
    conn.send(("ready", tokenizer, engine.context, engine.compile_failure))
    _Worker(conn, engine).run()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Worker:
    def __init__(self, conn, engine: Engine):
        self.conn, self.engine = conn, engine
        self.requests: dict[int, Sequence] = {}  # by the server's id, until they end
        self.events: list[tuple] = []
        self.read_at: dict[int, float] = {}  # requests read that have not yet sent text: when they were read
        self.server_gone = False

    def run(self) -> None:
        while not self.server_gone and self._read(block=not self.engine.has_work()):
            try:
                self.engine.admit()
                self._send()
                self.engine.decode()
            except Exception as exc:  # the shared forward failed: fail the requests in it, serve the next ones
                self.engine.fail_active(f"{type(exc).__name__}: {exc}")
            self._send()

    def _read(self, block: bool) -> bool:
        """Take in every message waiting (waiting for one if `block`); False when it is time to stop."""
        try:
            if block:
                self.conn.poll(None)
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "submit":
                    self._submit(*message[1:])
                elif message[0] == "cancel" and (seq := self.requests.get(message[1])) is not None:
                    Engine.cancel(seq)
                elif message[0] == "stop":
                    return False
        except Exception:  # the server is gone (EOF), or what it sent cannot be read: stop; it starts another
            return False
        return True

    def _submit(self, rid: int, prompt_ids: list[int], params) -> None:
        self.read_at[rid] = time.monotonic()
        try:
            self.requests[rid] = self.engine.submit(prompt_ids, params, on_text=lambda piece: self._text(rid, piece),
                                                    on_done=lambda seq: self._done(rid, seq))
        except Exception as exc:  # the server checks requests first: this is a bug, reported as one
            self.read_at.pop(rid, None)
            self.events.append(("done", rid, "error", f"{type(exc).__name__}: {exc}", "internal", []))

    def _text(self, rid: int, piece: str) -> None:
        if (read_at := self.read_at.pop(rid, None)) is not None:
            self.events.append(("first", rid, read_at))
        self.events.append(("text", rid, piece))

    def _done(self, rid: int, seq: Sequence) -> None:
        self.requests.pop(rid, None)
        self.read_at.pop(rid, None)
        self.events.append(("done", rid, seq.finish_reason, seq.error, seq.error_kind, seq.output_ids))

    def _send(self) -> None:
        if self.events:
            events, self.events = self.events, []
            try:
                self.conn.send(("events", events, self.engine.stats(), time.monotonic()))
            except Exception:  # the server is gone, or an event would not pickle: stop (it fails what we held)
                self.server_gone = True
