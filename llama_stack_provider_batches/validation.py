"""Checks of what a client sends to create, retrieve, cancel or list batches. Pure functions, no I/O.

A failed check raises InvalidParameterError, answered with HTTP 400 and OpenAI's error object, whose
`param` and `code` name the parameter and the error (http_errors.py).

Every field a caller controls is bounded here, because the batch record keeps some of them (the
record is rewritten on every progress update and read on every list) and error messages quote
them. Messages quote at most MAX_QUOTED_CHARS characters of caller text, with anything unprintable
escaped. A JSON body may carry lone surrogates ("\\ud800"), which UTF-8 cannot encode: a store or a
JSON answer meeting one fails or mangles it, so they are refused up front and never echoed raw.
"""

import re
from collections.abc import Mapping
from typing import Any

import httpx
import openai

SUPPORTED_ENDPOINTS: tuple[str, ...] = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/moderations",
)
SUPPORTED_COMPLETION_WINDOWS: tuple[str, ...] = ("24h",)

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

MIN_LIST_LIMIT = 1
MAX_LIST_LIMIT = 100

MAX_INPUT_FILE_ID_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 256
# Our ids are `batch_<32 hex>`; the bound leaves room for other shapes without letting a cursor or a
# path parameter of any size reach the store.
MAX_BATCH_ID_CHARS = 64
MAX_QUOTED_CHARS = 64

BATCH_FILE_PURPOSE = "batch"

_INPUT_FILE_ID = re.compile(r"[!-~]+")  # printable ASCII, no whitespace
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]+")


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


# --- quoting caller text in messages ------------------------------------------------------------


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


# --- create ---------------------------------------------------------------------------------------


def validate_create_params(
    input_file_id: Any, endpoint: Any, completion_window: Any, metadata: Mapping[str, Any] | None
) -> None:
    """Check the parameters of a create call; raise InvalidParameterError on the first bad one."""
    validate_input_file_id(input_file_id)
    if not isinstance(endpoint, str) or endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidParameterError(
            "endpoint",
            f"Invalid value for 'endpoint': {quoted(endpoint)}. "
            f"Supported values are: {', '.join(SUPPORTED_ENDPOINTS)}.",
        )
    if not isinstance(completion_window, str) or completion_window not in SUPPORTED_COMPLETION_WINDOWS:
        raise InvalidParameterError(
            "completion_window",
            f"Invalid value for 'completion_window': {quoted(completion_window)}. Supported values are: 24h.",
        )
    if metadata is not None:
        validate_metadata(metadata)


def validate_input_file_id(input_file_id: Any) -> None:
    """A file id: 1 to 256 printable ASCII characters without whitespace (file ids are `file-<alphanumerics>`)."""
    if not isinstance(input_file_id, str) or not input_file_id:
        raise InvalidParameterError("input_file_id", "'input_file_id' must be a non-empty string.", "invalid_request")
    if len(input_file_id) > MAX_INPUT_FILE_ID_CHARS:
        raise InvalidParameterError(
            "input_file_id",
            f"'input_file_id' {quoted(input_file_id)} is longer than {MAX_INPUT_FILE_ID_CHARS} characters.",
        )
    if not _INPUT_FILE_ID.fullmatch(input_file_id):
        raise InvalidParameterError(
            "input_file_id",
            f"'input_file_id' {quoted(input_file_id)} must be printable ASCII characters without whitespace.",
        )


def validate_idempotency_key(key: Any) -> None:
    """An idempotency key, if given: 1 to 256 printable characters (no control characters, valid Unicode)."""
    if key is None:
        return
    if not isinstance(key, str):
        raise InvalidParameterError("idempotency_key", "'idempotency_key' must be a string.")
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidParameterError(
            "idempotency_key",
            f"'idempotency_key' must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters long; got {len(key)}.",
        )
    # isprintable() is False for control, format, private-use and surrogate characters alike.
    if not key.isprintable():
        raise InvalidParameterError(
            "idempotency_key",
            f"'idempotency_key' {quoted(key)} must be printable text, without control characters or invalid Unicode.",
        )


def validate_metadata(metadata: Any) -> None:
    """OpenAI's metadata rules: at most 16 string pairs, keys <= 64 chars, values <= 512 chars; valid Unicode."""
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
                "metadata", f"'metadata' key {quoted(key)} is longer than {MAX_METADATA_KEY_CHARS} characters."
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidParameterError(
                "metadata",
                f"'metadata' value of key {quoted(key)} is longer than {MAX_METADATA_VALUE_CHARS} characters.",
            )
        if not is_valid_unicode(key) or not is_valid_unicode(value):
            raise InvalidParameterError(
                "metadata", f"'metadata' key {quoted(key)} or its value is not valid Unicode (a lone surrogate)."
            )


def validate_input_file_purpose(input_file_id: str, purpose: Any) -> None:
    """The input file must have been uploaded with purpose 'batch', as OpenAI requires."""
    if str(purpose) != BATCH_FILE_PURPOSE:
        raise InvalidParameterError(
            "input_file_id",
            f"The input file {shown(input_file_id)} has purpose {quoted(str(purpose))}; "
            f"a batch needs a file with purpose '{BATCH_FILE_PURPOSE}'.",
            "invalid_request",
        )


# --- retrieve, cancel and list ------------------------------------------------------------------


def is_batch_id(batch_id: Any) -> bool:
    """Whether `batch_id` can name a batch: 1 to 64 characters of [A-Za-z0-9_-]. Anything else is unknown."""
    return isinstance(batch_id, str) and len(batch_id) <= MAX_BATCH_ID_CHARS and bool(_BATCH_ID.fullmatch(batch_id))


def validate_list_after(after: Any) -> str | None:
    """The cursor of a list call: None, or something shaped like a batch id."""
    if after is None or is_batch_id(after):
        return after
    raise InvalidParameterError(
        "after",
        f"Invalid value for 'after': {quoted(after)}. It must be a batch id "
        f"(up to {MAX_BATCH_ID_CHARS} characters of letters, digits, '_' and '-').",
    )


def validate_list_limit(limit: Any) -> int:
    """The page size of a list call, which OpenAI bounds to 1..100."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not MIN_LIST_LIMIT <= limit <= MAX_LIST_LIMIT:
        raise InvalidParameterError(
            "limit",
            f"Invalid value for 'limit': {quoted(limit)}. It must be between {MIN_LIST_LIMIT} and {MAX_LIST_LIMIT}.",
        )
    return limit
