"""The server's routes, one small handler each, over the `ServerState` that `create_app` stores on
`app.state.server`: the checks that depend on the model served (its name, its context, its slots, the
sampling limits) and the answers built from the engine's finished requests."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..data.chat_template import ChatFormatError, chat_prompt_ids, chat_stop_strings
from .api_models import (AssistantMessage, ChatChoice, ChatRequest, ChatResponse, CompletionChoice,
                         CompletionRequest, CompletionResponse, GenerationOptions, Health, ModelCard, ModelList,
                         Usage)
from .engine import ContextLengthError, SamplingParams, Sequence
from .engine_process import EngineProcess
from .server_errors import ApiError
from .server_generation import EngineLoop, generate_all, stream

MAX_STOPS = 16
MAX_STOP_CHARS = 256  # each stop string is searched for at every token: a bounded cost per request
PROMPTS_PER_SLOT = 4  # a completion may hold up to this many prompts per engine slot


@dataclass
class ServerState:
    """What every handler shares: the engine's runner (`EngineLoop` or `EngineProcess`) and the model's
    public name."""
    loop: EngineLoop | EngineProcess
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.loop.tokenizer

    @property
    def max_prompts(self) -> int:
        return self.loop.slot_count * PROMPTS_PER_SLOT


async def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]
router = APIRouter()


@router.get("/health", response_model=Health)
async def health(state: State) -> Health:
    if (why := state.loop.unavailable) is not None:
        raise ApiError(503, f"the engine is unavailable: {why}", "server_error", code="engine_unavailable")
    return Health(model=state.model_name, **state.loop.stats())


@router.get("/v1/models", response_model=ModelList)
async def models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created)])


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request, state: State):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_text(prompts, "prompt")
    if not prompts or len(prompts) > state.max_prompts:
        raise ApiError(400, f"give 1 to {state.max_prompts} prompts", param="prompt", code="invalid_value")
    ids = [[state.tokenizer.prefix_id] + state.tokenizer.encode(p) for p in prompts]
    params = [sampling(state, body, len(i), 16) for i in ids]
    if body.stream:
        if len(ids) != 1:
            raise ApiError(400, "stream with one prompt at a time", param="prompt", code="invalid_value")
        return stream(state.loop, request, ids[0], params[0], state.model_name, chat=False)
    seqs = await generate_all(state.loop, request, ids, params)
    choices = [CompletionChoice(index=i, text=s.text, finish_reason=s.finish_reason) for i, s in enumerate(seqs)]
    return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=state.model_name,
                              choices=choices, usage=usage(ids, seqs))


@router.post("/v1/chat/completions", response_model=ChatResponse)
async def chat_completions(body: ChatRequest, request: Request, state: State):
    try:
        check_text([m.content for m in body.messages], "messages")
        ids = chat_prompt_ids([m.model_dump() for m in body.messages], state.tokenizer)
    except ChatFormatError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_value") from None
    params = sampling(state, body, len(ids), max(1, state.loop.context - len(ids)),
                      chat_stop_strings(state.tokenizer))
    if body.stream:
        return stream(state.loop, request, ids, params, state.model_name, chat=True)
    (seq,) = await generate_all(state.loop, request, [ids], [params])
    choice = ChatChoice(index=0, message=AssistantMessage(content=seq.text), finish_reason=seq.finish_reason)
    return ChatResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=state.model_name,
                        choices=[choice], usage=usage([ids], [seq]))


def usage(ids: list[list[int]], seqs: list[Sequence]) -> Usage:
    prompt_tokens = sum(len(i) for i in ids)
    completion_tokens = sum(len(s.output_ids) for s in seqs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def sampling(state: ServerState, body: GenerationOptions, prompt_len: int, default_max: int,
             extra_stop=()) -> SamplingParams:
    """The engine's parameters for one prompt of `body`, or an `ApiError` saying which option is refused."""
    if body.model != state.model_name:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    max_tokens = default_max if body.max_tokens is None else body.max_tokens
    if max_tokens <= 0:
        raise ApiError(400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    _check_ranges(body)
    stops = _stops(body)
    _check_fits(state.loop, prompt_len, max_tokens)
    return SamplingParams(max_new_tokens=max_tokens, temperature=float(body.temperature),
                          top_k=body.top_k or None, top_p=float(body.top_p) if body.top_p < 1 else None,
                          seed=body.seed, stop=tuple(stops) + tuple(extra_stop), stop_at_eot=not body.ignore_eos)


def _check_ranges(body: GenerationOptions) -> None:
    if not 0 <= body.temperature <= 5:
        raise ApiError(400, "temperature must be in [0, 5]", param="temperature", code="invalid_value")
    if not 0 < body.top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p", code="invalid_value")
    if body.seed is not None and not -(1 << 63) <= body.seed < 1 << 64:
        raise ApiError(400, "seed must be a 64-bit integer", param="seed", code="invalid_value")
    if body.top_k is not None and body.top_k < 0:
        raise ApiError(400, "top_k must be 0 (no cut-off) or positive", param="top_k", code="invalid_value")


def _stops(body: GenerationOptions) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    check_text(stops, "stop")
    if len(stops) > MAX_STOPS or not all(stops) or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters", param="stop", code="invalid_value")
    return stops


def _check_fits(loop, prompt_len: int, max_tokens: int) -> None:
    try:
        loop.check(prompt_len, max_tokens)
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), param="max_tokens" if prompt_len < loop.context else "prompt",
                       code="context_length_exceeded") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


def check_text(texts, param: str) -> None:
    """Refuse strings that are not Unicode text (lone surrogates, which JSON's escapes can spell)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{param} holds an unpaired surrogate (\\ud800-\\udfff): not valid Unicode text",
                           param=param, code="invalid_value") from None
