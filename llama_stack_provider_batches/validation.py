"""Checks of what a client sends to create or list batches. Pure functions, no I/O.

A failed check raises InvalidParameterError, which the stack answers with HTTP 400. The stack's
error body carries only a message, so the message names the parameter and the OpenAI error code;
the exception keeps both as attributes (`param`, `code`) for Python callers.
"""

from collections.abc import Mapping
from typing import Any

import httpx
import openai

SUPPORTED_ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
SUPPORTED_COMPLETION_WINDOWS: tuple[str, ...] = ("24h",)

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

MIN_LIST_LIMIT = 1
MAX_LIST_LIMIT = 100


class InvalidParameterError(openai.BadRequestError, ValueError):
    """A request parameter that OpenAI's Batch API would refuse with HTTP 400.

    Why openai.BadRequestError: the stack registers its error handler for that class (and answers
    400), while a plain ValueError reaches Starlette's catch-all handler, which answers 400 too but
    then re-raises, and uvicorn drops the client's keep-alive connection.
    """

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        text = f"{message} (param: {param}, code: {code})"
        error = {"message": text, "type": "invalid_request_error", "param": param, "code": code}
        response = httpx.Response(400, request=httpx.Request("POST", "/v1/batches"))
        super().__init__(text, response=response, body=error)


def validate_create_params(
    input_file_id: Any, endpoint: Any, completion_window: Any, metadata: Mapping[str, Any] | None
) -> None:
    """Check the parameters of a create call; raise InvalidParameterError on the first bad one."""
    if not isinstance(input_file_id, str) or not input_file_id:
        raise InvalidParameterError("input_file_id", "'input_file_id' must be a non-empty string.", "invalid_request")
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidParameterError(
            "endpoint",
            f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: {', '.join(SUPPORTED_ENDPOINTS)}.",
        )
    if completion_window not in SUPPORTED_COMPLETION_WINDOWS:
        raise InvalidParameterError(
            "completion_window",
            f"Invalid value for 'completion_window': {completion_window!r}. Supported values are: 24h.",
        )
    if metadata is not None:
        validate_metadata(metadata)


def validate_metadata(metadata: Any) -> None:
    """OpenAI's metadata rules: at most 16 string pairs, keys <= 64 chars, values <= 512 chars."""
    if not isinstance(metadata, Mapping):
        raise InvalidParameterError("metadata", "'metadata' must be an object of string keys and values.")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidParameterError(
            "metadata", f"'metadata' may hold at most {MAX_METADATA_PAIRS} pairs; got {len(metadata)}."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidParameterError("metadata", "'metadata' keys and values must be strings.")
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidParameterError(
                "metadata", f"'metadata' key {key[:20]!r}... is longer than {MAX_METADATA_KEY_CHARS} characters."
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidParameterError(
                "metadata", f"'metadata' value of key {key!r} is longer than {MAX_METADATA_VALUE_CHARS} characters."
            )


def validate_list_limit(limit: Any) -> int:
    """The page size of a list call, which OpenAI bounds to 1..100."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not MIN_LIST_LIMIT <= limit <= MAX_LIST_LIMIT:
        raise InvalidParameterError(
            "limit", f"Invalid value for 'limit': {limit!r}. It must be between {MIN_LIST_LIMIT} and {MAX_LIST_LIMIT}."
        )
    return limit
