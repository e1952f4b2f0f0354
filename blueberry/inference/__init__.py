"""Using a trained model: the generation engine (static KV cache, continuous batching, compiled decode),
weight quantization, speculative decoding, the OpenAI-compatible server and the terminal chat."""

from .engine import ContextLengthError, Engine, SamplingParams, Sequence

__all__ = ["ContextLengthError", "Engine", "SamplingParams", "Sequence"]
