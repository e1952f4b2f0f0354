"""`EngineProcess`: an engine in a process of its own, what `blueberry serve` runs (as vLLM's engine core
does). In the server's process the engine's Python between kernels would take turns with the event
loop's for the interpreter lock; in its own process it never waits for HTTP. The server's side is this
class: the same interface as `server_generation.EngineLoop`, a sender thread (so that no caller ever
blocks on a full pipe), a reader thread that hands each request its text and its end, and the engine
process started again, failing only the requests it held, if it dies. The engine's side, and the
messages between the two, are `engine_worker`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import queue
import sys
import threading
import time
from collections import Counter
from typing import Callable

from ..errors import BlueberryError
from .engine import SamplingParams, Sequence, check_request
from .engine_worker import serve_engine

RETRY_S = (1, 2, 5, 10, 30)  # waits between attempts to start a dead engine again (the last one repeats)


class EngineProcessError(BlueberryError):
    """The engine process could not be started."""


class EngineProcess:
    """Runs `Engine(model, tokenizer, slots=, compile=)` in a spawned process, where `load()` (picklable)
    returns (model, tokenizer). Starting waits until the model is loaded (and, with `compile`, the step
    compiled for each of `engine.row_buckets(slots)`: minutes on a CPU, at every start, restarts too) and
    raises what loading raised; `compile_failure` says why the step stayed eager, if it did."""

    def __init__(self, load: Callable, *, slots: int = 8, compile: bool = False, threads: int | None = None):
        self._spec = (load, slots, compile, threads)
        self.slot_count = slots
        self._lock = threading.Lock()  # guards the state below; never held while sending or receiving
        self._ending = threading.Lock()  # one thread at a time waits for a process to end (and reaps it)
        self._requests: dict[int, Sequence] = {}  # in flight, by id
        self._ids = itertools.count(1)
        self._finished: Counter = Counter()
        self._active = 0  # requests in the engine's slots, as of its last message
        self._submitted_at: dict[int, float] = {}  # requests sent that have no text yet: when
        # where the first texts' time went, summed over requests: waiting to be read by the engine process (it
        # reads between steps), in it (waiting for a slot, prefill, sampling), and on the way back to this one
        self._first_text = {"count": 0, "to_engine_s": 0.0, "in_engine_s": 0.0, "back_s": 0.0}
        self._closing = False
        self._unavailable: str | None = None  # why requests cannot reach an engine now, while they cannot
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # (connection, message) for the sender thread
        self._process = None
        self._conn = self._start()
        for target, name in ((self._read, "reader"), (self._send_all, "sender")):
            threading.Thread(target=target, name=f"blueberry-engine-{name}", daemon=True).start()
        atexit.register(self.close)

    def _start(self):
        """Spawn the engine process and wait until its model is loaded; its connection."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
        ours, theirs = context.Pipe()
        process = context.Process(target=serve_engine, args=(theirs, *self._spec), name="blueberry-engine")
        with self._lock:  # `close` either comes first (no process) or stops this one, even while it loads
            if self._closing:
                ours.close(), theirs.close()
                raise EngineProcessError("the server is stopping")
            process.start()
            self._process = process
        theirs.close()
        try:
            message = ours.recv()
        except BaseException as exc:
            self._end_process(process, ours)
            if isinstance(exc, EOFError):
                raise EngineProcessError(f"the engine process exited while loading the model (exit code "
                                         f"{process.exitcode})") from None
            raise
        if message[0] == "failed":
            self._end_process(process, ours)
            raise message[1]
        _, self.tokenizer, self.context, self.compile_failure = message
        return ours

    # ---- the runner's interface (as EngineLoop's) ----
    @property
    def unavailable(self) -> str | None:
        """None while the engine serves, else why it does not (it is being started again)."""
        return self._unavailable

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_text=None, on_done=None) -> Sequence:
        """Send a request to the engine; `on_text(piece)` and `on_done(seq)` are called on the reader
        thread. A request that cannot reach the engine (it is being started again) ends at once, as an error
        of kind "unavailable"."""
        self.check(len(prompt_ids), params.max_new_tokens)
        seq = Sequence(list(prompt_ids), params, on_text, id=next(self._ids), on_done=on_done)
        with self._lock:
            conn, why = self._conn, "the server is stopping" if self._closing else self._unavailable
            if conn is not None and why is None:
                self._requests[seq.id] = seq
                self._submitted_at[seq.id] = time.monotonic()
        if conn is None or why is not None:
            self._end(seq, "error", f"the engine is unavailable: {why}", "unavailable", [])
        else:
            self._outbox.put((conn, ("submit", seq.id, seq.prompt_ids, params)))
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ask for `seq` to end ("cancelled") at the engine's next step; thread-safe, never blocks."""
        seq.cancelled = True
        with self._lock:
            conn = self._conn if seq.id in self._requests else None
        if conn is not None:
            self._outbox.put((conn, ("cancel", seq.id)))

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        check_request(prompt_len, max_new_tokens, self.context)

    def stats(self) -> dict:
        """Requests in the engine's slots, waiting for one, finished by reason, and `first_token`: the seconds
        the requests' first texts spent reaching the engine process, in it and coming back, summed;
        thread-safe."""
        with self._lock:
            in_flight, finished, first = len(self._requests), dict(self._finished), dict(self._first_text)
        active = min(self._active, in_flight)
        return {"active": active, "queued": in_flight - active, "finished": finished, "first_token": first}

    def close(self) -> None:
        """Stop the engine process and end the requests still in flight (it also stops by itself when this
        process goes away)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            conn, self._conn = self._conn, None
        if conn is None:  # loading (being started again): nothing to ask
            with self._ending:
                self._process.kill()
        self._stop(self._process, conn)
        self._fail_in_flight("the server is stopping")

    # ---- the sender and reader threads ----
    def _send_all(self) -> None:
        while True:
            conn, message = self._outbox.get()
            with contextlib.suppress(OSError, ValueError):  # that engine process is gone: the reader fails its requests
                conn.send(message)

    def _read(self) -> None:
        while not self._closing:
            conn = self._conn
            if conn is None:
                self._start_again()
                continue
            try:
                _, events, stats, sent_at = conn.recv()
            except (EOFError, OSError):
                self._lost_engine()
                continue
            except Exception as exc:  # a message that does not unpickle: start afresh rather than guess
                self._lost_engine(f"the engine process sent what could not be read ({type(exc).__name__}: {exc})")
                continue
            try:
                self._active = stats["active"]
                for event in events:
                    self._dispatch(event, sent_at)
            except Exception as exc:  # a bug here must not leave requests waiting on nobody
                self._lost_engine(f"the server could not read the engine's events ({type(exc).__name__}: {exc})")

    def _dispatch(self, event: tuple, sent_at: float) -> None:
        if event[0] == "first":
            self._count_first_text(event[1], event[2], sent_at)
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

    def _count_first_text(self, rid: int, read_at: float, sent_at: float) -> None:
        now = time.monotonic()
        with self._lock:
            if (submitted_at := self._submitted_at.pop(rid, None)) is None:
                return
            first = self._first_text
            first["count"] += 1
            first["to_engine_s"] += read_at - submitted_at
            first["in_engine_s"] += sent_at - read_at
            first["back_s"] += now - sent_at

    def _end(self, seq: Sequence, finish_reason, error, error_kind, output_ids) -> None:
        seq.finish_reason, seq.error, seq.error_kind, seq.output_ids = finish_reason, error, error_kind, output_ids
        with self._lock:
            self._finished[finish_reason] += 1
            self._submitted_at.pop(seq.id, None)
        seq.mark_done()

    def _fail_in_flight(self, reason: str) -> list[Sequence]:
        with self._lock:
            lost, self._requests = list(self._requests.values()), {}
        for seq in lost:
            self._end(seq, "error", reason, "unavailable", [])
        return lost

    def _lost_engine(self, why: str | None = None) -> None:
        """The engine process died (`why` None) or cannot be understood: make sure it is gone (its memory
        free for the next), fail the requests it held; the reader starts another."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._unavailable = None if self._closing else "the engine process is being started again"
        if self._closing:
            return
        self._stop(self._process, conn)
        reason = why or f"the engine process stopped (exit code {self._process.exitcode})"
        self._unavailable = f"{reason}; it is being started again"
        lost = self._fail_in_flight(reason)
        print(f"blueberry serve: {reason}; {len(lost)} requests failed, starting it again", file=sys.stderr,
              flush=True)

    def _start_again(self) -> None:
        """Start the engine process again, waiting longer after each failure; while it is down, requests end
        at once as unavailable (503) and /health says why."""
        for attempt in itertools.count():
            try:
                conn = self._start()
            except Exception as exc:
                if self._closing:
                    return
                self._unavailable = f"the engine process could not be started again: {exc}"
                print(f"blueberry serve: {self._unavailable}", file=sys.stderr, flush=True)
                wait = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                for _ in range(wait * 10):
                    if self._closing:
                        return
                    time.sleep(0.1)
                continue
            with self._lock:
                if not self._closing:
                    self._conn, self._active, self._unavailable = conn, 0, None
                    return
            self._stop(self._process, conn)  # `close` came while it loaded
            return

    def _stop(self, process, conn) -> None:
        """Ask the engine process to stop (through the sender, after what it still has to send) and make sure
        it does."""
        if conn is not None:
            self._outbox.put((conn, ("stop",)))
        self._end_process(process, conn)

    def _end_process(self, process, conn) -> None:
        """Wait for `process` to end (killing it after 10 s), then close our end of its pipe."""
        with self._ending:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        if conn is not None:
            conn.close()
