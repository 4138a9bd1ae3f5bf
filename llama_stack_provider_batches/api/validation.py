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
from collections.abc import Mapping, Sequence
from typing import Any

from ..domain.errors import InvalidParameterError, is_valid_unicode, quoted, shown
from ..domain.records import MAX_BATCH_ID_CHARS, is_batch_id

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

BATCH_FILE_PURPOSE = "batch"

_INPUT_FILE_ID = re.compile(r"[!-~]+")  # printable ASCII, no whitespace


# --- quoting caller text in messages ------------------------------------------------------------


# --- create ---------------------------------------------------------------------------------------


def validate_create_params(
    input_file_id: Any,
    endpoint: Any,
    completion_window: Any,
    metadata: Mapping[str, Any] | None,
    served_endpoints: Sequence[str] = SUPPORTED_ENDPOINTS,
) -> None:
    """Check the parameters of a create call; raise InvalidParameterError on the first bad one.

    `served_endpoints` are those of SUPPORTED_ENDPOINTS the running stack serves: an endpoint OpenAI
    does not batch is refused with that list, so that it names only what this stack accepts. One that
    OpenAI batches but the stack does not serve passes here, for the caller to refuse with the reason
    (stack_apis.unavailable_message).
    """
    validate_input_file_id(input_file_id)
    if not isinstance(endpoint, str) or endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidParameterError(
            "endpoint",
            f"Invalid value for 'endpoint': {quoted(endpoint)}. Supported values are: {', '.join(served_endpoints)}.",
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


def json_type_name(value: Any) -> str:
    """The JSON type of a value as OpenAI's "Invalid type" messages name it: "a string", "an array", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int, of which bool is a kind
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a value of type {type(value).__name__}"


def invalid_type(param: str, expected: str, value: Any) -> InvalidParameterError:
    """OpenAI's refusal of a parameter of the wrong JSON type, naming the type it got (never the value)."""
    message = f"Invalid type for '{param}': expected {expected}, but got {json_type_name(value)} instead."
    return InvalidParameterError(param, message, "invalid_type")


def metadata_param(key: Any) -> str:
    """The `param` of an error about one metadata pair, `metadata.<key>` as OpenAI names it (the key shortened)."""
    return f"metadata.{shown(key)}"


def validate_metadata(metadata: Any) -> None:
    """OpenAI's metadata rules: at most 16 string pairs, keys <= 64 chars, values <= 512 chars; valid Unicode."""
    if not isinstance(metadata, Mapping):
        raise invalid_type("metadata", "an object", metadata)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidParameterError(
            "metadata", f"'metadata' may hold at most {MAX_METADATA_PAIRS} pairs; got {len(metadata)}."
        )
    for key, value in metadata.items():
        if not isinstance(key, str):  # only from Python callers: JSON object keys are strings
            message = f"Invalid type for a key of 'metadata': expected a string, but got {json_type_name(key)} instead."
            raise InvalidParameterError("metadata", message, "invalid_type")
        if not isinstance(value, str):
            raise invalid_type(metadata_param(key), "a string", value)
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


OUTPUT_EXPIRY_SECONDS = (3600, 30 * 24 * 3600)  # OpenAI's bounds: an hour to 30 days


def validate_output_expires_after(value: Any, minimum: int = OUTPUT_EXPIRY_SECONDS[0]) -> int | None:
    """`output_expires_after` as OpenAI checks it: `{"anchor": "created_at", "seconds": 3600..2592000}`
    (from `minimum` where an operator lowered it); the seconds, or None when not given."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("output_expires_after", "an object", value)
    unknown = sorted(set(value) - {"anchor", "seconds"})
    if unknown:
        message = f"Unrecognized parameter: 'output_expires_after.{shown(unknown[0])}'."
        raise InvalidParameterError(f"output_expires_after.{shown(unknown[0])}", message, "unknown_parameter")
    anchor, seconds = value.get("anchor"), value.get("seconds")
    if anchor is None:
        message = "Missing required parameter: 'output_expires_after.anchor'."
        raise InvalidParameterError("output_expires_after.anchor", message, "missing_required_parameter")
    if anchor != "created_at":
        message = f"Invalid value: {quoted(anchor)}. Supported values are: 'created_at'."
        raise InvalidParameterError("output_expires_after.anchor", message, "invalid_value")
    if seconds is None:
        message = "Missing required parameter: 'output_expires_after.seconds'."
        raise InvalidParameterError("output_expires_after.seconds", message, "missing_required_parameter")
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise invalid_type("output_expires_after.seconds", "an integer", seconds)
    low, high = minimum, OUTPUT_EXPIRY_SECONDS[1]
    if seconds < low:
        message = (
            "Invalid 'output_expires_after.seconds': integer below minimum value."
            f" Expected a value >= {low}, but got {seconds} instead."
        )
        raise InvalidParameterError("output_expires_after.seconds", message, "integer_below_min_value")
    if seconds > high:
        message = (
            "Invalid 'output_expires_after.seconds': integer above maximum value."
            f" Expected a value <= {high}, but got {seconds} instead."
        )
        raise InvalidParameterError("output_expires_after.seconds", message, "integer_above_max_value")
    return seconds
