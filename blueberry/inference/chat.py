"""`blueberry chat`: a conversation in the terminal over the engine, streamed token by token.

The conversation is kept in context (rendered with the chat template, data/chat_template.py); when it
no longer fits the model's window the oldest turns are dropped, and the user is told. `/reset` starts
over; Ctrl-C stops the current answer; Ctrl-D (end of input) quits.
"""

from __future__ import annotations

import dataclasses
import sys

from ..data.chat_template import ChatFormatError, chat_prompt_ids, chat_stop_strings
from .engine import Engine, SamplingParams


def chat_loop(model, tokenizer, params: SamplingParams, system: str | None = None, read=input, write=None) -> int:
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    engine = Engine(model, tokenizer, slots=1)
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    write("Chat with the model: /reset starts over, Ctrl-D quits.\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return 0
        if line.strip() == "/reset":
            messages = list(opening)
            write("(conversation cleared)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids, messages = _fit(messages, tokenizer, params.max_new_tokens, engine.context, write)
        except ChatFormatError as exc:
            write(f"({exc}; that message was not sent)\n")
            messages.pop()
            continue
        if ids is None:
            messages = list(opening)
            continue
        turn = dataclasses.replace(params, stop=tuple(params.stop) + chat_stop_strings(tokenizer))
        seq = engine.submit(ids, turn, on_text=write)
        try:
            engine.run_until_done()
        except KeyboardInterrupt:
            engine.cancel(seq)
            engine.step()  # releases the slot
            write(" [stopped]")
        if not seq.text.endswith("\n"):
            write("\n")
        messages.append({"role": "assistant", "content": seq.text.strip()})


def _fit(messages, tokenizer, max_new_tokens, context, write):
    """The prompt ids, dropping the oldest exchanges (after any system message) until the answer fits. A
    user message goes with the assistant's answer to it, so the roles still alternate (as strict
    templates demand)."""
    dropped = False
    while True:
        ids = chat_prompt_ids(messages, tokenizer)
        if len(ids) + max_new_tokens <= context:
            if dropped:
                write("(oldest turns dropped to fit the model's context)\n")
            return ids, messages
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            write(f"(that message does not fit the model's context of {context} tokens with "
                  f"{max_new_tokens} to answer; say less, or lower --max-new-tokens)\n")
            return None, messages
        drop = 2 if messages[first]["role"] == "user" and messages[first + 1]["role"] == "assistant" else 1
        del messages[first:first + drop]
        dropped = True
