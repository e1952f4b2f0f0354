"""`EngineProcess`: an engine in a process of its own, what `blueberry serve` runs (as vLLM's engine core
does). In the server's process the engine's Python between kernels would take turns with the event
loop's for the interpreter lock; in its own process it never waits for HTTP. The server's side is this
class: the same interface as `server_generation.EngineLoop`, a reader thread that hands each request its
text and its end, and the engine process restarted, failing only the requests it held, if it dies. The
engine's side, and the messages between the two, are `engine_worker`.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import sys
import threading
import time
from collections import Counter
from typing import Callable

from ..errors import BlueberryError
from .engine import SamplingParams, Sequence, check_request
from .engine_worker import serve_engine


class EngineProcessError(BlueberryError):
    """The engine process could not be started."""


class EngineProcess:
    """Runs `Engine(model, tokenizer, slots=, compile=)` in a spawned process, where `load()` (picklable)
    returns (model, tokenizer). Starting waits until the model is loaded and raises what loading raised."""

    def __init__(self, load: Callable, *, slots: int = 8, compile: bool = False, threads: int | None = None):
        self._spec = (load, slots, compile, threads)
        self.slot_count = slots
        self._lock = threading.Lock()  # guards the requests in flight and the pipe's sending end
        self._requests: dict[int, Sequence] = {}  # in flight, by id
        self._ids = itertools.count(1)
        self._finished: Counter = Counter()
        self._active = 0  # requests in the engine's slots, as of its last message
        self._submitted_at: dict[int, float] = {}  # requests sent that have no text yet: when
        # where the first tokens' time went, summed over requests: waiting to be read by the engine (it reads
        # between steps), in the engine (prefill and sampling), and on the way back to this process
        self._first_token = {"count": 0, "to_engine_s": 0.0, "in_engine_s": 0.0, "back_s": 0.0}
        self._closing = False
        self._unavailable = "the engine process is restarting"  # why a request cannot reach it, while it cannot
        self._conn, self._process = self._start()
        self._reader = threading.Thread(target=self._read, name="blueberry-engine-reader", daemon=True)
        self._reader.start()
        atexit.register(self.close)

    def _start(self):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
        ours, theirs = context.Pipe()
        process = context.Process(target=serve_engine, args=(theirs, *self._spec), name="blueberry-engine")
        process.start()
        theirs.close()
        try:
            message = ours.recv()
        except EOFError:
            process.join()
            raise EngineProcessError(f"the engine process exited while loading the model (exit code "
                                     f"{process.exitcode})") from None
        if message[0] == "failed":
            process.join()
            raise message[1]
        _, self.tokenizer, self.context = message
        return ours, process

    # ---- the runner's interface (as EngineLoop's) ----
    def submit(self, prompt_ids: list[int], params: SamplingParams, on_text=None, on_done=None) -> Sequence:
        """Send a request to the engine; `on_text(piece)` and `on_done(seq)` are called on the reader
        thread. A request that cannot reach the engine (it is restarting) ends at once, as an error."""
        self.check(len(prompt_ids), params.max_new_tokens)
        seq = Sequence(list(prompt_ids), params, on_text, id=next(self._ids), on_done=on_done)
        with self._lock:
            try:
                if self._conn is None:
                    raise OSError(self._unavailable)
                self._submitted_at[seq.id] = time.time()
                self._conn.send(("submit", seq.id, seq.prompt_ids, params))
                self._requests[seq.id] = seq
                return seq
            except OSError as exc:
                failure = str(exc)
        self._end(seq, "error", f"the engine is unavailable: {failure}", "unavailable", [])
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ask for `seq` to end ("cancelled") at the engine's next step; thread-safe."""
        seq.cancelled = True
        with self._lock:
            if seq.id in self._requests and self._conn is not None:
                try:
                    self._conn.send(("cancel", seq.id))
                except OSError:
                    pass  # the engine died: the reader fails the request

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        check_request(prompt_len, max_new_tokens, self.context)

    def stats(self) -> dict:
        """Requests in the engine's slots, waiting for one, finished by reason, and `first_token`: the seconds
        the requests' first tokens spent reaching the engine, in it, and coming back, summed; thread-safe."""
        with self._lock:
            in_flight, finished, first = len(self._requests), dict(self._finished), dict(self._first_token)
        active = min(self._active, in_flight)
        return {"active": active, "queued": in_flight - active, "finished": finished, "first_token": first}

    def close(self) -> None:
        """Stop the engine process (it also stops by itself when this process goes away)."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ---- the reader thread ----
    def _read(self) -> None:
        while not self._closing and (conn := self._conn) is not None:
            try:
                _, events, stats, sent_at = conn.recv()
            except (EOFError, OSError):
                if not self._closing:
                    self._restart()
                continue
            self._active = stats["active"]
            for event in events:
                self._dispatch(event, sent_at)

    def _dispatch(self, event: tuple, sent_at: float) -> None:
        if event[0] == "first":
            self._count_first_token(event[1], event[2], sent_at)
            return
        with self._lock:
            seq = (self._requests.get if event[0] == "text" else self._requests.pop)(event[1], None)
        if seq is None:
            return
        if event[0] == "done":
            self._end(seq, *event[2:])
            return
        seq.text += event[2]
        if seq.on_text is not None:
            try:
                seq.on_text(event[2])
            except Exception:  # its listener is gone (its event loop closed): nobody reads on
                self.cancel(seq)

    def _count_first_token(self, rid: int, read_at: float, sent_at: float) -> None:
        now = time.time()
        with self._lock:
            if (submitted_at := self._submitted_at.pop(rid, None)) is None:
                return
            first = self._first_token
            first["count"] += 1
            first["to_engine_s"] += read_at - submitted_at
            first["in_engine_s"] += sent_at - read_at
            first["back_s"] += now - sent_at

    def _end(self, seq: Sequence, finish_reason, error, error_kind, output_ids) -> None:
        seq.finish_reason, seq.error, seq.error_kind, seq.output_ids = finish_reason, error, error_kind, output_ids
        with self._lock:
            self._finished[finish_reason] += 1
            self._submitted_at.pop(seq.id, None)
        seq.done.set()
        if seq.on_done is not None:
            try:
                seq.on_done(seq)
            except Exception:
                pass

    def _restart(self) -> None:
        """The engine process died: fail the requests it held, start another."""
        with self._lock:
            lost, self._requests = list(self._requests.values()), {}
            conn, self._conn = self._conn, None
        self._process.join(5)
        reason = f"the engine process stopped (exit code {self._process.exitcode})"
        print(f"blueberry serve: {reason}; {len(lost)} requests failed, starting it again", file=sys.stderr,
              flush=True)
        if conn is not None:
            conn.close()
        for seq in lost:
            self._end(seq, "error", reason, "unavailable", [])
        try:
            conn, process = self._start()
        except Exception as exc:
            self._unavailable = f"the engine process could not be started again: {exc}"
            print(f"blueberry serve: {self._unavailable}", file=sys.stderr, flush=True)
            return
        with self._lock:
            self._conn, self._process, self._active = conn, process, 0
