"""The generation engine shared by `generate`, `chat`, the server and evaluation.

A fixed number of slots, each a row of a static (pre-allocated) KV cache. A request is prefilled alone
into the first free slot (its prompt in one forward); then every `step()` decodes one token for the
slots at once — eager, the slots up to the last busy one; compiled (`torch.compile`, as gpt-fast does),
a fixed-shape call over the smallest of its compiled row counts (`compile_rows`, by default all the
slots) that holds the last busy one. A row's result does not depend on the
others. Requests join at the next step and
leave when they finish (continuous batching). Each request samples with its own temperature, top-k,
top-p and seeded generator, and stops at end-of-text, at a stop string or after max_new_tokens.

The context is the model's window (max_seq_len): a prompt plus max_new_tokens beyond it is refused
(`ContextLengthError`), never silently cut.

A failure while sampling or appending one request's token (or in its own prefill) ends that request
alone (finish reason "error"; `error_kind` "request" when its sampling parameters failed); only a failure
of the shared decode forward fails the batch (`fail_active`), and the engine then serves on.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.generation import clean_logits, is_greedy, sample_rows
from ..models.moe import MixtureOfExperts
from ..system import detect_capabilities


class ContextLengthError(ValueError):
    """The prompt and the tokens asked for do not fit in the model's context window."""


def check_request(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """Refuse (ValueError, ContextLengthError) a request that cannot be generated in `context` tokens."""
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if prompt_len + max_new_tokens > context:
        raise ContextLengthError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) "
                                 f"exceeds the model's context of {context} tokens; shorten one of them")


@dataclass
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eot: bool = True


@dataclass
class Sequence:
    """One request's state, from queued to finished."""
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # called with each new piece of text
    id: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # text released so far (never a partial character or a partial stop string)
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string), "length", "cancelled", "error"
    error: str | None = None
    error_kind: str | None = None  # "request": its own sampling parameters failed; "unavailable": the engine
    # process stopped under it (`EngineProcess`); "internal": anything else
    on_done: Callable[["Sequence"], None] | None = None  # called once, after the last text (on the thread that
    # runs the engine, or that reads an engine process's messages)
    cancelled: bool = False
    slot: int | None = None
    generator: torch.Generator | None = None
    decoded: str = ""  # all the complete text of output_ids (incremental detokenization state below)
    _prefix_offset: int = 0
    _read_offset: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def mark_done(self) -> None:
        """Set `done` and call `on_done`: once, when it has ended (a listener gone, its event loop closed, must
        not stop whoever ends it)."""
        self.done.set()
        if self.on_done is not None:
            with contextlib.suppress(Exception):
                self.on_done(self)


def row_buckets(slots: int) -> tuple[int, ...]:
    """Row counts to compile a server's decode step for: the powers of two below `slots`, and `slots`. One
    stream then runs the one-row step, not a step over every slot."""
    return tuple(sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots}))


class Engine:
    def __init__(self, model, tokenizer, *, slots: int = 8, compile: bool = False, dtype: torch.dtype | None = None,
                 compile_rows: tuple[int, ...] | None = None):
        """`compile_rows`: the row counts the compiled step is compiled for (each at its first use, or all at
        once by `warm_up`), each step taking the smallest that holds the last busy slot; default all the
        slots alone (one compilation). Ignored without `compile`."""
        if slots < 1:
            raise ValueError(f"an engine needs at least one slot, got {slots}")
        self.model = model.eval()
        if dtype is not None:
            self.model.to(dtype)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.capabilities = detect_capabilities(self.device.type)
        self.model.fuse_projections(self.capabilities.decode_weights_transposed(next(model.parameters()).dtype))
        self.context = model.config.max_seq_len
        self.slots: list[Sequence | None] = [None] * slots
        self.caches = model.new_kv_caches(slots)
        self.queue: deque[Sequence] = deque()
        self._ids = itertools.count(1)
        self.finished_counts: Counter = Counter()  # requests by finish reason
        self._lock = threading.Lock()
        self.compiled = compile
        self.compile_failure: str | None = None  # why the compiled step fell back to eager, if it did
        self.compile_rows = tuple(sorted(set(compile_rows or ()) | {slots})) if compile else ()
        if compile and not 1 <= self.compile_rows[0] <= self.compile_rows[-1] <= slots:
            raise ValueError(f"compile_rows must be between 1 and the {slots} slots, got {compile_rows}")
        self._decode = self._compiled(self._decode_logits) if compile else self._decode_logits

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the decode step for each of `compile_rows` now, before any request (so that none waits for a
        compilation); nothing without `compile`. It decodes a token at position 0 in every row: a KV cache
        keeps it at position 0, which a request's prefill writes first, and a recurrent state (Mamba-2,
        retention) starts afresh at a forward from position 0, as every prefill is."""
        if self.has_work():
            raise RuntimeError("warm_up runs before any request")
        for rows in self.compile_rows:
            if not self.compiled:  # no compiler here (`compile_failure`): nothing to warm
                return
            tokens, positions = (torch.zeros(rows, 1, dtype=torch.long, device=self.device) for _ in range(2))
            self._decode(tokens, positions, None)  # two tensors, as a step passes (dynamo guards on aliasing)

    # ---- requests ----
    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        check_request(prompt_len, max_new_tokens, self.context)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_text=None, on_done=None) -> Sequence:
        """Queue a request (it joins the batch at the next step); thread-safe. `on_done(seq)` is called once
        when it ends, however it ends (after its last `on_text`)."""
        self.check(len(prompt_ids), params.max_new_tokens)
        seq = Sequence(list(prompt_ids), params, on_text, id=next(self._ids), on_done=on_done)
        seq.generator = torch.Generator(device=self.device)
        seq.generator.manual_seed(params.seed if params.seed is not None else random.SystemRandom().randrange(2**62))
        with self._lock:
            self.queue.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.slots)

    @staticmethod
    def cancel(seq: Sequence) -> None:
        """Ask for `seq` to end (finish reason "cancelled") at the next step; thread-safe."""
        seq.cancelled = True

    def fail(self, seq: Sequence, error: str, kind: str = "internal") -> None:
        """End `seq` now with finish reason "error", freeing its slot (on the thread that runs `step`)."""
        if seq.finished and seq.done.is_set():
            return
        seq.finish_reason, seq.error, seq.error_kind = "error", error, kind
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self._release(seq.slot)
        else:
            with self._lock:  # still queued: it must not be admitted (and finished) a second time
                self.queue = deque(s for s in self.queue if s is not seq)
            self._finish(seq)

    def fail_active(self, error: str) -> list[Sequence]:
        """End every request in a slot with `error` (after a failure of the shared forward); the
        queued ones keep waiting and the engine goes on."""
        failed = [s for s in self.slots if s is not None]
        for seq in failed:
            self.fail(seq, error)
        return failed

    def stats(self) -> dict:
        """A consistent snapshot: requests in slots, queued, and finished by reason; thread-safe."""
        with self._lock:
            return {"active": sum(s is not None for s in self.slots), "queued": len(self.queue),
                    "finished": dict(self.finished_counts)}

    # ---- the loop ----
    def step(self) -> list[Sequence]:
        """Admit queued requests into free slots (prefill), then decode one token for every slot.
        Returns the requests that finished during this step."""
        return self.admit() + self.decode()

    @torch.inference_mode()
    def admit(self) -> list[Sequence]:
        """The first half of a step: drop the cancelled requests, prefill queued ones into the free slots
        (each gets its first token). Returns the requests that finished."""
        return self._drop_cancelled() + self._admit()

    @torch.inference_mode()
    def decode(self) -> list[Sequence]:
        """The second half of a step: one token for every busy slot. Returns the requests that finished."""
        active = [i for i, s in enumerate(self.slots) if s is not None]
        if not active:
            return []
        # eager: the slots up to the last busy one; compiled: the smallest compiled row count that holds them
        rows = active[-1] + 1
        if self.compiled:
            rows = next(r for r in self.compile_rows if r >= rows)
        last, where = [0] * rows, [0] * rows
        for i in active:
            seq = self.slots[i]
            last[i], where[i] = seq.output_ids[-1], len(seq.prompt_ids) + len(seq.output_ids) - 1
        tokens = torch.tensor(last, device=self.device)[:, None]
        positions = torch.tensor(where, device=self.device)[:, None]
        length = None if self.compiled else max(where) + 1  # eager: attend over the positions reached only
        logits = self._decode(tokens, positions, length)
        seqs = [self.slots[i] for i in active]
        return [seq for seq, token in zip(seqs, self._sample(seqs, logits[active])) if self._advance(seq, token)]

    def _advance(self, seq: Sequence, token) -> bool:
        """Append a sampled token (or fail `seq` alone if its sampling or appending raised); True when
        `seq` has finished."""
        if isinstance(token, Exception):
            self.fail(seq, f"sampling failed: {type(token).__name__}: {token}", kind="request")
            return True
        try:
            if self._append(seq, token):
                self._release(seq.slot)
                return True
        except Exception as exc:
            self.fail(seq, f"{type(exc).__name__}: {exc}")
            return True
        return False

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Generate for every prompt (batched through the slots); the finished requests in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        self.run_until_done()
        return seqs

    # ---- internals ----
    def _admit(self) -> list[Sequence]:
        """Move queued requests into the free slots and prefill them: each run of neighbouring slots in one
        forward (the prompts padded at their ends) where the model allows it, else one at a time."""
        finished, admitted = [], []
        for i, slot in enumerate(self.slots):
            if slot is not None:
                continue
            seq = self._next_queued(finished)
            if seq is None:
                break
            seq.slot, self.slots[i] = i, seq
            admitted.append(seq)
        for group in self._prefill_groups(admitted):
            finished += self._prefill_and_sample(group)
        return finished

    def _next_queued(self, finished: list[Sequence]) -> Sequence | None:
        """The next queued request that is not cancelled (those are finished on the way), or None."""
        while True:
            with self._lock:
                if not self.queue:
                    return None
                seq = self.queue.popleft()
            if not seq.cancelled:
                return seq
            seq.finish_reason = "cancelled"
            self._finish(seq)
            finished.append(seq)

    def _prefill_groups(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """Requests to prefill together: neighbouring slots whose padded batch is at most twice their real
        tokens (a long prompt beside short ones goes alone); one each when the padding would reach a
        recurrent state or per-sequence routing (`pads_independently`)."""
        if not self.model.pads_independently:
            return [[seq] for seq in admitted]
        groups: list[list[Sequence]] = []
        for seq in admitted:
            group = groups[-1] if groups else []
            lengths = [len(s.prompt_ids) for s in group] + [len(seq.prompt_ids)]
            if group and group[-1].slot == seq.slot - 1 and len(lengths) * max(lengths) <= 2 * sum(lengths):
                group.append(seq)
            else:
                groups.append([seq])
        return groups

    def _prefill_and_sample(self, group: list[Sequence]) -> list[Sequence]:
        """Prefill `group` (neighbouring slots) and sample each one's first token; the finished ones. A
        failing forward of several is retried one by one, so that only a request whose own forward fails
        ends (with "error")."""
        try:
            logits = self._prefill(group)
        except Exception as exc:
            if len(group) > 1:
                return [s for seq in group for s in self._prefill_and_sample([seq])]
            self.fail(group[0], f"{type(exc).__name__}: {exc}")
            return group
        return [seq for seq, token in zip(group, self._sample(group, logits)) if self._advance(seq, token)]

    def _prefill(self, group: list[Sequence]) -> torch.Tensor:
        """The last prompt position's logits of each request of `group` (rows, vocab), in one forward over
        their slots; shorter prompts are padded at the end: what the padding writes to the cache lies beyond
        the row's position, is never attended to and is overwritten as the row decodes."""
        lengths = [len(seq.prompt_ids) for seq in group]
        width = max(lengths)
        ids = torch.tensor([seq.prompt_ids + [0] * (width - len(seq.prompt_ids)) for seq in group], device=self.device)
        positions = torch.arange(width, device=self.device).expand(len(group), width)
        last = torch.zeros(len(group), width, dtype=torch.bool, device=self.device)
        last[torch.arange(len(group)), torch.tensor(lengths) - 1] = True
        first = group[0].slot
        caches = [c.rows(first, first + len(group), width) for c in self.caches]
        return self.model(ids, kv_caches=caches, positions=positions, logits_at=last).logits

    def _decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, length: int | None) -> torch.Tensor:
        """Logits of one token for each of the first rows; eager (`length` given): over the positions any of
        them has reached, compiled: over all the cache's positions (one fixed shape per row count)."""
        rows = tokens.shape[0]
        caches = (self.caches if length is None and rows == len(self.slots)
                  else [c.rows(0, rows, length) for c in self.caches])
        return self.model(tokens, kv_caches=caches, positions=positions).logits[:, -1]

    def _compiled(self, fn):
        import torch._inductor.config

        # each engine compiles its own model: allow more than dynamo's default few graphs per function
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(fn, dynamic=False)
        # the options hold while dynamo traces too (given to torch.compile they reach inductor alone, and
        # freezing, for one, then folds less)
        experts = any(isinstance(m, MixtureOfExperts) for m in self.model.modules())
        options = torch._inductor.config.patch(self.capabilities.decode_compile_options(experts))

        def call(*args):
            nonlocal compiled
            try:
                with options:
                    return compiled(*args)
            except Exception as exc:  # no working compiler here: eager, the same numbers
                self.compile_failure = f"{type(exc).__name__}: {exc}"
                self.compiled, compiled = False, fn  # eager from now on: the busy rows only
                return fn(*args)
        return call

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> list:
        """Next token of each sequence (a row of `logits`): greedy rows in one argmax, the others in groups
        of equal parameters, each row with its own generator (so a row's draw does not depend on its
        neighbours). A row whose sampling raises gets the exception instead of a token: it fails alone."""
        out: list = [0] * len(seqs)
        groups: dict[tuple, list[int]] = {}
        for r, seq in enumerate(seqs):
            p = seq.params
            groups.setdefault((None,) if is_greedy(p.temperature) else (p.temperature, p.top_k, p.top_p), []).append(r)
        for key, rows in groups.items():
            if key == (None,):
                tokens = clean_logits(logits[rows]).argmax(-1).tolist()
            else:
                tokens = Engine._sample_group([seqs[r] for r in rows], logits[rows], key)
            for r, token in zip(rows, tokens):
                out[r] = token
        return out

    @staticmethod
    def _sample_group(seqs: list[Sequence], logits: torch.Tensor, params: tuple) -> list:
        """Sample rows of one (temperature, top_k, top_p); when that fails, row by row, so that only the
        rows whose own sampling raises get the exception."""
        try:
            return sample_rows(logits, *params, [s.generator for s in seqs]).tolist()
        except Exception:
            out = []
            for r, seq in enumerate(seqs):
                try:
                    out.append(int(sample_rows(logits[r:r + 1], *params, [seq.generator])[0]))
                except Exception as exc:
                    out.append(exc)
            return out

    def _append(self, seq: Sequence, token: int) -> bool:
        """Add `token` to `seq`; True when it has finished."""
        p = seq.params
        if p.stop_at_eot and token == self.tokenizer.eot_id:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(token)
            if self._release_text(seq):
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= p.max_new_tokens:
                seq.finish_reason = "length"
        if seq.finished:
            self._release_text(seq, final=True)
        return seq.finished

    def _detokenize(self, seq: Sequence) -> None:
        """Extend `seq.decoded` by the new tokens' text, decoding only the last few tokens (the text of a
        token can depend on its neighbours, and a multi-byte character can span tokens)."""
        ids = seq.output_ids
        before = self.tokenizer.decode(ids[seq._prefix_offset:seq._read_offset])
        after = self.tokenizer.decode(ids[seq._prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.decoded += after[len(before):]
            seq._prefix_offset, seq._read_offset = seq._read_offset, len(ids)

    def _release_text(self, seq: Sequence, final: bool = False) -> bool:
        """Pass on the text that is certain; True when a stop string appeared (the text ends before it)."""
        self._detokenize(seq)
        full = seq.decoded
        if final and seq._read_offset < len(seq.output_ids):  # an incomplete character at the very end
            full += self.tokenizer.decode(seq.output_ids[seq._read_offset:])
        found = [at for at in (full.find(stop) for stop in seq.params.stop if stop) if at >= 0]
        if found:  # the earliest stop string, whichever comes first in the list
            self._emit(seq, full[:min(found)])
            return True
        if not final:
            hold = _stop_prefix_length(full, seq.params.stop)  # may be the start of a stop string
            full = full[:len(full) - hold] if hold else full
        self._emit(seq, full)
        return False

    def _emit(self, seq: Sequence, text: str) -> None:
        if len(text) > len(seq.text) and text.startswith(seq.text):
            delta, seq.text = text[len(seq.text):], text
            if seq.on_text is not None:
                seq.on_text(delta)

    def _release(self, slot: int) -> Sequence:
        seq = self.slots[slot]
        self.slots[slot] = None
        self._finish(seq)
        return seq

    def _finish(self, seq: Sequence) -> None:
        with self._lock:
            self.finished_counts[seq.finish_reason] += 1
        seq.mark_done()

    def _drop_cancelled(self) -> list[Sequence]:
        finished = []
        for i, seq in enumerate(self.slots):
            if seq is not None and seq.cancelled:
                seq.finish_reason = "cancelled"
                finished.append(self._release(i))
        return finished


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back until it resolves)."""
    best = 0
    for stop in (s for s in stops if s):
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
