"""Errors shared by every layer, and how caller text is quoted in their messages.

    InvalidParameterError   a parameter OpenAI's Batch API refuses with HTTP 400 (`param`, `code`)
    LimitReachedError       a create refused by a limit on waiting work (HTTP 429)
    status_code_of          the HTTP status any exception stands for, if it carries one
    shown, quoted           caller text as a message may show it: bounded, unprintables escaped

Messages quote at most MAX_QUOTED_CHARS characters of caller text, with anything unprintable escaped.
A JSON body may carry lone surrogates ("\\ud800"), which UTF-8 cannot encode (`is_valid_unicode`).
"""

from typing import Any

import httpx
import openai

from ..stack import ConflictError


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, as a plain int (the stack's own errors carry an httpx.codes member)."""
    status = getattr(exc, "status_code", None)
    return int(status) if isinstance(status, int) and not isinstance(status, bool) else None


RATE_LIMIT_CODE = "rate_limit_exceeded"


class LimitReachedError(ConflictError):
    """A create refused because a limit on waiting work is reached (HTTP 429, OpenAI's `rate_limit_exceeded`).

    Why a ConflictError: the stack registers its error handler for that class, and answers with the
    `status_code` the exception carries; an exception it has no handler for reaches Starlette's
    catch-all, which answers too but then re-raises, and uvicorn drops the client's connection.
    """

    status_code = 429  # type: ignore[assignment]
    code = RATE_LIMIT_CODE


MAX_QUOTED_CHARS = 64


class InvalidParameterError(openai.BadRequestError, ValueError):
    """A request parameter that OpenAI's Batch API would refuse with HTTP 400; `param` and `code` name
    the parameter and OpenAI's error code (the API answers them as fields: http_errors.py).

    Why openai.BadRequestError: the stack registers its error handler for that class (and answers
    400), while a plain ValueError reaches Starlette's catch-all handler, which answers 400 too but
    then re-raises, and uvicorn drops the client's keep-alive connection.
    """

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
        response = httpx.Response(400, request=httpx.Request("POST", "/v1/batches"))
        super().__init__(message, response=response, body=error)


def shown(value: Any) -> str:
    """Caller text as a message may show it, unquoted: its first 64 characters, unprintable ones escaped."""
    if not isinstance(value, str):
        return quoted(value)
    head = repr(value[:MAX_QUOTED_CHARS])[1:-1]  # repr escapes control characters and lone surrogates
    return head + "..." if len(value) > MAX_QUOTED_CHARS else head


def quoted(value: Any) -> str:
    """A caller's value as a message may quote it: a string shortened and escaped, a number, or its type."""
    if isinstance(value, str):
        return f"'{shown(value)}'"
    if value is None or isinstance(value, bool | int | float):
        try:
            text = repr(value)
        except ValueError:  # an int of more digits than Python converts to text
            return "a number too long to show"
        return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."
    return f"a value of type {type(value).__name__}"


def is_valid_unicode(text: str) -> bool:
    """Whether `text` can be encoded as UTF-8, i.e. holds no lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class WebhookEndpointNotFoundError(LookupError):
    """No webhook endpoint with this id that the caller may see (HTTP 404)."""

    def __init__(self, endpoint_id: str) -> None:
        super().__init__(f"No webhook endpoint found with id '{shown(endpoint_id)}'.")
