"""The lines of output and error files, exactly as OpenAI writes them. Pure functions returning JSON text.

    success:         {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": {...}}, "error": null}
    HTTP error:      {"id", "custom_id", "response": {"status_code": 4xx/5xx, "request_id", "body": {"error": {...}}},
                      "error": null}
    no HTTP answer:  {"id", "custom_id", "response": null, "error": {"code", "message"}}

`body` is a JSON object, never a string holding JSON. Each line is one line of text: JSON escapes
every newline and tab inside strings, and success lines escape U+0085, U+2028 and U+2029 too, which
some readers (Python's str.splitlines) take for line breaks. Every line encodes to UTF-8 and reads
back as valid Unicode: text a line echoes (custom_id, messages, a backend's error fields) has any lone
surrogate replaced by U+FFFD, and messages are cut to MAX_MESSAGE_CHARS, whatever a backend sent.
"""

import json
import os
import random
from typing import Any

JsonObject = dict[str, Any]

# The largest response body a success line holds; endpoints.result_for_response turns a larger answer
# into a `response_too_large` error line. Generous for real answers (2,048 embeddings of 768 dimensions
# as JSON floats are about 33 MB, of 3,072 dimensions as base64 about 34 MB; 128k tokens of chat text
# stay under 1 MB) while keeping any one line, and the chunk it is stored in, far below the SQL
# store's limits (a SQLite value and a PostgreSQL text value stop at 1 GB).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_MESSAGE_CHARS = 2_000
MAX_ERROR_FIELD_CHARS = 256  # type, param, code and request_id of a backend error
# A token count above this is a backend's mistake, counted as 0: no response reads or writes two billion
# tokens, and sums over 50,000 requests stay exact in any JSON reader (below 2**53).
MAX_TOKENS_PER_RESPONSE = 2**31 - 1


# Result lines get two ids each: 128 random bits from a generator seeded by the OS, not a uuid4 (a
# system call and an object per id, 1 % of a zero-latency batch's profile). Reseeded in a forked
# child, so that worker processes never share a sequence. The ids need to be unique, not secret.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def _random_hex() -> str:
    return f"{_ids.getrandbits(128):032x}"


def new_request_line_id() -> str:
    """An id for one line of a result file."""
    return f"batch_req_{_random_hex()}"


def new_request_id() -> str:
    """An id standing for the backend's request id when it gave none."""
    return f"req_{_random_hex()}"


def dumps(line: JsonObject) -> str:
    """One result line as compact JSON."""
    return json.dumps(line, separators=(",", ":"))


def valid_unicode(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, so that it encodes to UTF-8 (strict JSON readers
    refuse a lone surrogate escape); surrogates that do pair up become the one character they stand for."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def clipped(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters and made valid Unicode: a line never echoes unbounded text."""
    return valid_unicode(text if len(text) <= limit else text[: limit - 3] + "...")


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8; raises UnicodeEncodeError when it holds a lone surrogate."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def one_line(body_json: str) -> str:
    """JSON text with the line breaks JSON leaves raw (U+0085, U+2028, U+2029) escaped.

    Pydantic writes them raw. They can only stand inside strings of valid JSON, where their escapes mean the same.
    """
    if body_json.isascii():
        return body_json
    for char, escape in (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        body_json = body_json.replace(char, escape)
    return body_json


def _as_text(value: object) -> str:
    """`value` as text; "" when it has none (str() of an integer past Python's digit limit raises)."""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:
        return ""


def _error_field(value: object) -> str | int | None:
    """A type, param or code of a backend error as a small JSON scalar (a number too big for a double becomes text)."""
    if value is None or (type(value) is int and abs(value) < 2**53):
        return value
    return clipped(_as_text(value), MAX_ERROR_FIELD_CHARS)


def _request_id(request_id: object) -> str:
    """The backend's request id, bounded, or a new one."""
    if isinstance(request_id, str) and request_id:
        return clipped(request_id, MAX_ERROR_FIELD_CHARS)
    return new_request_id()


def success_line(custom_id: str, body_json: str, request_id: str | None = None) -> str:
    """An output-file line for a request the model answered; `body_json` is the response as JSON text.

    Built around the body's text, so a response is serialized once, by its own model.
    """
    head = dumps({"id": new_request_line_id(), "custom_id": valid_unicode(custom_id)})[:-1]
    request_id = json.dumps(_request_id(request_id))
    body_json = one_line(body_json)
    return f'{head},"response":{{"status_code":200,"request_id":{request_id},"body":{body_json}}},"error":null}}'


MAX_LISTED_PROBLEMS = 5  # of an invalid request body, in its error message


def field_path(location: tuple[int | str, ...]) -> str:
    """A pydantic error location as OpenAI names parameters: `messages[0].role`."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def invalid_body_error(problems: list[tuple[tuple[int | str, ...], str]]) -> JsonObject:
    """The OpenAI error object of a request body the stack refused: where and what is wrong, from
    (location, message) pairs, never the caller's input nor a documentation link."""
    shown = [f"{field_path(location) or 'body'}: {message}" for location, message in problems[:MAX_LISTED_PROBLEMS]]
    more = len(problems) - MAX_LISTED_PROBLEMS
    text = "Invalid request body: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "") + "."
    param = field_path(problems[0][0]) if problems else None
    return {"message": text, "type": "invalid_request_error", "param": param or None, "code": "invalid_request"}


def http_error_line(custom_id: str, status_code: int, error: JsonObject, request_id: str | None = None) -> str:
    """An error-file line for a request the backend refused with an HTTP status."""
    detail = {
        "message": clipped(_as_text(error.get("message", ""))),
        "type": _error_field(error.get("type")),
        "param": _error_field(error.get("param")),
        "code": _error_field(error.get("code")),
    }
    response = {"status_code": status_code, "request_id": _request_id(request_id), "body": {"error": detail}}
    return dumps(
        {"id": new_request_line_id(), "custom_id": valid_unicode(custom_id), "response": response, "error": None}
    )


def failure_line(custom_id: str | None, code: str, message: str) -> str:
    """An error-file line for a request that got no HTTP answer (connection lost, timeout, expiry...).

    `custom_id` is None only for a request that never ran and whose custom_id is not known any more.
    """
    error = {"code": code, "message": clipped(message)}
    shown_id = None if custom_id is None else valid_unicode(custom_id)
    return dumps({"id": new_request_line_id(), "custom_id": shown_id, "response": None, "error": error})


def expired_line(custom_id: str | None) -> str:
    """An error-file line for a request the completion window closed on before it ran."""
    message = "This request could not be executed before the completion window expired."
    return failure_line(custom_id, "batch_expired", message)


def input_unavailable_line(custom_id: str | None) -> str:
    """An error-file line for a request left unrun because the batch's input file cannot be read any more."""
    message = "The batch's input file could not be read any more, so this request never ran."
    return failure_line(custom_id, "input_file_unavailable", message)


def credentials_unavailable_line(custom_id: str | None) -> str:
    """An error-file line for a request left unrun by a restart, when the batch needs its creator's credentials."""
    message = (
        "This batch was created with per-request provider credentials, which are never stored; a server restart "
        "interrupted it before this request ran. Submit the remaining requests in a new batch."
    )
    return failure_line(custom_id, "credentials_unavailable", message)


def token_count(value: object) -> int:
    """A token count as reported, or 0 when it is not one (a string, float, bool, negative or absurd number)."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS_PER_RESPONSE else 0


def _first_count(usage: JsonObject, names: tuple[str, str]) -> int:
    """The count under the first name that holds one (chat says prompt_tokens, newer APIs input_tokens)."""
    return token_count(usage.get(names[0])) or token_count(usage.get(names[1]))


def token_usage(body: object) -> tuple[int, int]:
    """(input, output) tokens of a response body: chat, completion and embedding responses count
    `prompt_tokens`/`completion_tokens`, a Response `input_tokens`/`output_tokens`.

    Never raises: whatever a backend reports, usage that is not a count counts as 0.
    """
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    input_tokens = _first_count(usage, ("prompt_tokens", "input_tokens"))
    output_tokens = _first_count(usage, ("completion_tokens", "output_tokens"))
    return input_tokens, output_tokens
