"""The server's wire format: the pydantic models of its request bodies, its answers and its errors (the
OpenAI shapes, with vLLM's `ignore_eos`). Validation of the types lives here; the limits that depend on
the model served (context, slots, the model's name) are checked by the route handlers."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt


# ---- requests ----
class GenerationOptions(BaseModel):
    """The options both generation routes take; unknown fields are ignored, as OpenAI's clients send some."""
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


class CompletionRequest(GenerationOptions):
    prompt: Union[str, list[str]]
    max_tokens: Optional[StrictInt] = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(GenerationOptions):
    messages: list[ChatMessage] = Field(min_length=1)


# ---- answers ----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "blueberry"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """`status` and the model's name, then the engine's snapshot (`Engine.stats()`); under `blueberry serve`
    also `first_token`: the requests' first tokens' seconds reaching the engine process, in it and back,
    summed over `count` requests (`EngineProcess.stats()`)."""
    status: Literal["ok"] = "ok"
    model: str
    active: int
    queued: int
    finished: dict[str, int]
    first_token: dict[str, int | float] | None = None


# ---- errors ----
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error the server answers, with a 4xx status (a 500 only for a bug)."""
    error: ErrorInfo
