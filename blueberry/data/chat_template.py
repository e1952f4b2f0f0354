"""Turning a conversation into text: the tokenizer's own chat template when it has one (an imported
model's), else Blueberry's plain template for base models:

    System: {content}            (only if the conversation has a system message)
    User: {content}
    Assistant: {content}
    ...
    Assistant:                   (the generation prompt; the model continues after it)

Each message is one line block ending in a newline; generation stops at the next "\\nUser:" (the
model starting the user's turn). The same rendering serves training on chats and the chat server.
"""

from __future__ import annotations

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:", "\nSystem:")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (the message says what is wrong)."""


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
    return messages


def has_own_template(tokenizer) -> bool:
    auto = getattr(tokenizer, "auto", None)
    return bool(getattr(auto, "chat_template", None))


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{ROLES[m['role']]}: {m['content'].strip()}\n" for m in check_messages(messages))
    return text + ("Assistant:" if add_generation_prompt else "")


def chat_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of the conversation followed by the assistant's turn to speak."""
    check_messages(messages)
    if has_own_template(tokenizer):
        try:
            text = tokenizer.auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            if not is_template_error(exc):
                raise
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ChatFormatError(f"the model's chat template refused the conversation: {message}") from None
        return tokenizer.encode(text)
    return [tokenizer.prefix_id] + tokenizer.encode(render_plain(messages))


def is_template_error(exc: Exception) -> bool:
    """A jinja2 TemplateError: what a strict template's raise_exception (or a broken template) raises."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return False
    return isinstance(exc, TemplateError)


def chat_stop_strings(tokenizer) -> tuple[str, ...]:
    """Stop strings of the template in use (a tokenizer's own template ends turns with its eos token)."""
    return () if has_own_template(tokenizer) else PLAIN_STOP


# render_plain as a Jinja template (for exports: transformers' tokenizer_config.json, GGUF), opening with the
# prefix token (bos_token) as chat_prompt_ids does
PLAIN_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message roles must be system, user or assistant') }}{% endif %}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']] }}: "
    "{{ message['content'] | trim }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def jinja_chat_template(tokenizer) -> str:
    """The Jinja chat template that renders as `chat_prompt_ids` does: the tokenizer's own, else PLAIN_JINJA."""
    if has_own_template(tokenizer):
        return tokenizer.auto.chat_template
    auto = getattr(tokenizer, "auto", None)
    if auto is not None and auto.bos_token_id is None:  # an imported tokenizer whose prefix token is its eos
        return PLAIN_JINJA.replace("bos_token", "eos_token")
    return PLAIN_JINJA
