"""Estimating a request's input tokens before it runs, as OpenAI counts prompts, for the per-user
token quota (`max_enqueued_tokens_per_user`).

An estimate, not the model's count: the backend's tokenizer and chat template are not known here.
Text is counted with a tiktoken encoding (`cl100k_base` unless the config names another for the
model); around it each endpoint adds what OpenAI's prompt accounting adds:

- chat: every message costs MESSAGE_OVERHEAD tokens for its framing, plus its role, its name (and
  one more token) and its content; text parts count as text, each image as IMAGE_TOKENS, each file
  or audio part as ATTACHMENT_TOKENS; tool calls and tool definitions count as their JSON text; the
  reply's own framing costs REPLY_OVERHEAD.
- completions, embeddings, moderations: the prompt or input text, or the length of a token array.
- responses: `instructions`, and `input` as a string or a list of items: messages as chat messages,
  other items as content parts (text, image, file), anything else (a function call's output) as
  its JSON text.

On chat bodies of text messages the estimate is within one token per message of the tokenizer run
over the whole conversation in OpenAI's chat format (tests/unit/requests/test_token_estimates.py):
content between two special tokens is tokenized alone either way; only the newline after the role
may merge with the content's first characters.

Estimating is CPU work (about a microsecond per character in tiktoken's Rust code, which releases
the GIL): callers run it in a thread, never on the event loop.
"""

import json
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

MESSAGE_OVERHEAD = 3  # <|im_start|>, the newline after the role, <|im_end|> (and its newline merged)
REPLY_OVERHEAD = 3  # <|im_start|>assistant<|message|>: the reply's framing, counted as prompt
NAME_OVERHEAD = 1
IMAGE_TOKENS = 85  # OpenAI's price of a low-detail image; larger images cost more, unknown here
ATTACHMENT_TOKENS = 85  # a file or audio part: its cost depends on what it holds, unknown here (not its base64)
DEFAULT_ENCODING = "cl100k_base"

TextCounter = Callable[[str], int]


@cache
def text_counter(encoding_name: str = DEFAULT_ENCODING) -> TextCounter:
    """Counts the tokens of a text in `encoding_name`, a tiktoken encoding; loading it reads its file once
    (from TIKTOKEN_CACHE_DIR on a machine without internet access)."""
    import tiktoken  # the stack's own dependency; imported here so that importing this module costs nothing

    encoding = tiktoken.get_encoding(encoding_name)
    return lambda text: len(encoding.encode_ordinary(text))


def load_encodings(names: set[str]) -> None:
    """Load the encodings a token quota needs, at start-up: a missing file stops the server with the
    reason, rather than every batch failing at validation. Blocking: run it in a thread."""
    for name in sorted(names | {DEFAULT_ENCODING}):
        try:
            text_counter(name)
        except Exception as exc:
            raise RuntimeError(
                f"max_enqueued_tokens_per_user estimates tokens with tiktoken's {name!r} encoding, which cannot be"
                f" loaded ({type(exc).__name__}: {exc}). Put its file in the directory TIKTOKEN_CACHE_DIR names"
                " (`python tools/tiktoken_cache.py` does for cl100k_base), or unset the limit."
            ) from exc


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _tokens_of_array(value: list[Any]) -> int | None:
    """A token array's length (a list of ints), or the sum over a list of token arrays; None for anything else."""
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return len(value)
    if all(isinstance(item, list) for item in value):
        arrays = [_tokens_of_array(item) for item in value]
        return None if any(n is None for n in arrays) else sum(n for n in arrays if n is not None)
    return None


def _text_input(value: Any, count: TextCounter) -> int:
    """A prompt or input: a string, a list of strings, a token array or a list of token arrays, or parts."""
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        as_tokens = _tokens_of_array(value) if value else 0
        if as_tokens is not None:
            return as_tokens
        return sum(_text_input(item, count) for item in value)
    if isinstance(value, dict):
        return _content_part(value, count)
    return count(_json_text(value)) if value is not None else 0


def _content_part(part: dict[str, Any], count: TextCounter) -> int:
    """One part of a message's content: text of any kind counts as text, an image as IMAGE_TOKENS, a file
    or audio as ATTACHMENT_TOKENS (never their base64 data as text)."""
    kind = part.get("type")
    if isinstance(kind, str) and "image" in kind:
        return IMAGE_TOKENS
    if isinstance(kind, str) and ("file" in kind or "audio" in kind):
        return ATTACHMENT_TOKENS
    for key in ("text", "refusal", "input_text", "output_text"):
        if isinstance(part.get(key), str):
            return count(part[key])
    return count(_json_text(part))


def _content(content: Any, count: TextCounter) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    if isinstance(content, list):
        return sum(_content_part(p, count) if isinstance(p, dict) else _text_input(p, count) for p in content)
    return count(_json_text(content))


def _message(message: Any, count: TextCounter) -> int:
    """One chat message (or a Responses message item) with its framing."""
    if not isinstance(message, dict):
        return MESSAGE_OVERHEAD + count(_json_text(message))
    tokens = MESSAGE_OVERHEAD
    role = message.get("role")
    if isinstance(role, str):
        tokens += count(role)
    name = message.get("name")
    if isinstance(name, str):
        tokens += NAME_OVERHEAD + count(name)
    tokens += _content(message.get("content"), count)
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            tokens += count(_json_text(message[key]))
    return tokens


def chat_tokens(body: dict[str, Any], count: TextCounter) -> int:
    messages = body.get("messages")
    tokens = REPLY_OVERHEAD
    if isinstance(messages, list):
        tokens += sum(_message(m, count) for m in messages)
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            tokens += count(_json_text(body[key]))
    return tokens


def responses_tokens(body: dict[str, Any], count: TextCounter) -> int:
    tokens = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        tokens += count(instructions)
    value = body.get("input")
    if isinstance(value, str):
        tokens += MESSAGE_OVERHEAD + count("user") + count(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                tokens += _message(item, count) if "role" in item else _content_part(item, count)
            else:
                tokens += _text_input(item, count)
    if body.get("tools"):
        tokens += count(_json_text(body["tools"]))
    return tokens


ENDPOINT_ESTIMATES: dict[str, Callable[[dict[str, Any], TextCounter], int]] = {
    "/v1/chat/completions": chat_tokens,
    "/v1/completions": lambda body, count: _text_input(body.get("prompt"), count),
    "/v1/embeddings": lambda body, count: _text_input(body.get("input"), count),
    "/v1/moderations": lambda body, count: _text_input(body.get("input"), count),
    "/v1/responses": responses_tokens,
}


def body_estimator(endpoint: str, encodings: Mapping[str, str]) -> Callable[[dict[str, Any]], int]:
    """Estimates the bodies of a batch on `endpoint`, each with the encoding `encodings` names for its
    model (by model id), or DEFAULT_ENCODING."""

    def estimate(body: dict[str, Any]) -> int:
        model = body.get("model")
        encoding = encodings.get(model, DEFAULT_ENCODING) if isinstance(model, str) else DEFAULT_ENCODING
        return estimate_tokens(endpoint, body, text_counter(encoding))

    return estimate


def estimate_tokens(endpoint: str, body: dict[str, Any], count: TextCounter) -> int:
    """The input tokens of one request `body` to `endpoint` (0 for an endpoint not listed)."""
    estimate = ENDPOINT_ESTIMATES.get(endpoint)
    return estimate(body, count) if estimate is not None else 0
