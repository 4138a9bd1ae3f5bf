"""Reading a batch input file: JSONL lines into an index of requests, or OpenAI's validation errors.

Pure functions. A scan checks each line and keeps only where it lies in the raw bytes (three
integer arrays), not the parsed line: a request is parsed again when it runs. So a 50,000-line file
costs its raw size plus about 1 MB, not 50,000 dictionaries.

One bad line fails the whole batch, as OpenAI does; `errors` lists the first MAX_LISTED_ERRORS
problems, and a last entry says how many more there were.

The parser is total: whatever the bytes, it returns requests or validation errors and never raises
(a line it cannot check becomes an `invalid_json_line` error), so no file can stall a batch in
`validating`. What it accepts:

- Each line is one JSON object in strict UTF-8. Lines end with LF or CRLF; blank and
  whitespace-only lines are skipped but still count in line numbers.
- A UTF-8 byte order mark at the very start of the file is ignored; anywhere else it is invalid JSON.
  Other encodings (UTF-16, UTF-32, Latin-1) are refused as "not valid UTF-8".
- Numbers must be standard JSON: NaN, Infinity and -Infinity are refused, and so are numbers too large
  for a double (1e999) and integers longer than Python's int-string limit (4,300 digits).
- Strings must be valid Unicode: a `\\ud800`-style escape without its pair (a lone surrogate) is
  refused; a proper pair (`\\ud83d\\ude00`) is one character and accepted.
- Objects and arrays nest at most MAX_JSON_DEPTH (64) deep.
- `custom_id` is a string of 1 to MAX_CUSTOM_ID_CHARS (512) characters.

Error messages quote caller text (custom_id, url) as validation.quoted does: cut short, escaped.
"""

import json
import math
import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from openai.types.batch_error import BatchError

from ..domain.errors import quoted

MAX_REQUESTS = 50_000
MAX_EMBEDDING_INPUTS = 50_000  # OpenAI's bound on the inputs of one embeddings batch, over all its lines
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_LISTED_ERRORS = 100
MAX_JSON_DEPTH = 64  # far beyond any request body (a tool's JSON schema nests about 10 deep)
MAX_CUSTOM_ID_CHARS = 512
BYTE_ORDER_MARK = b"\xef\xbb\xbf"

# The body fields each endpoint needs, with the JSON types they may have.
REQUIRED_BODY_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "/v1/chat/completions": {"model": (str,), "messages": (list,)},
    "/v1/completions": {"model": (str,), "prompt": (str, list)},
    "/v1/embeddings": {"model": (str,), "input": (str, list)},
    "/v1/responses": {"model": (str,), "input": (str, list)},
    "/v1/moderations": {"input": (str, list)},
}
# Fields an endpoint does not need, with the types they must have when given. A moderation without a
# model uses the stack's default moderation model, as OpenAI's moderations API uses its own.
OPTIONAL_BODY_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "/v1/moderations": {"model": (str,)},
}
TOP_LEVEL_FIELDS: dict[str, type] = {"custom_id": str, "method": str, "url": str, "body": dict}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {quoted(text)} is out of range")
    return value


# One decoder for every line (building one per line would cost more than parsing a short line).
# NaN and out-of-range numbers are refused: a request body must be JSON that any backend can read.
DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)

# Maps `[` and `{` to +1, `]` and `}` to -1 (as signed bytes), after deleting every other byte.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")
# An escape of a UTF-16 surrogate, \uD800 to \uDFFF: the only way a JSON line can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def nesting_depth(raw: bytes) -> int:
    """How deep objects and arrays nest in a JSON text, by a scan that skips strings (no parsing, no recursion).

    Exact for valid JSON. On invalid JSON it is never below the depth a parser reaches before it fails
    (the scan reads strings as the parser does up to the failure), so a line it passes cannot recurse deeper.
    """
    if b"\\" in raw:  # dropping escaped backslashes, then escaped quotes, leaves the quotes around strings
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(raw.split(b'"')[::2])
    steps = outside_strings.translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def too_deep(raw: bytes) -> bool:
    """Whether a JSON text nests deeper than MAX_JSON_DEPTH; cheap for ordinary lines, which have few brackets."""
    return raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and nesting_depth(raw) > MAX_JSON_DEPTH


def is_valid_unicode(data: Any) -> bool:
    """Whether every string in parsed JSON encodes to UTF-8 (a lone surrogate escape does not)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(raw: bytes) -> Any:
    """The JSON value of a line already checked by `read_line`."""
    return DECODER.decode(raw.decode("utf-8"))


@dataclass(frozen=True)
class RequestLine:
    """One valid request of the input file."""

    line: int
    custom_id: str
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        """The model the body names; None for a moderation left to the stack's default model."""
        return self.body.get("model")


@dataclass
class InputIndex:
    """Where each valid request lies in the raw input, in file order."""

    content: bytes = b""
    starts: array = field(default_factory=lambda: array("Q"))
    ends: array = field(default_factory=lambda: array("Q"))
    line_numbers: array = field(default_factory=lambda: array("Q"))

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, start: int, end: int, line: int) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.line_numbers.append(line)

    def request(self, position: int) -> RequestLine:
        """The request at `position` (0-based, among valid requests), parsed afresh."""
        data = parse_json(self.content[self.starts[position] : self.ends[position]])
        return RequestLine(line=self.line_numbers[position], custom_id=data["custom_id"], body=data["body"])


@dataclass
class ParsedInput:
    """The requests of a file and the first line naming each model, or the reasons it was refused."""

    index: InputIndex = field(default_factory=InputIndex)
    errors: list[BatchError] = field(default_factory=list)
    first_line_of_model: dict[str | None, int] = field(default_factory=dict)  # None: no model named
    custom_ids: list[str] = field(default_factory=list)  # of the requests, in file order
    # The model the batch's `model` field shows: its first line's, or what the stack resolves it to.
    model: str | None = None
    # With an estimator: each request's estimated input tokens and the model it names, in file order.
    token_estimates: array = field(default_factory=lambda: array("Q"))
    request_models: list[str | None] = field(default_factory=list)

    def tokens_per_shard(self, ranges: list[tuple[int, int]]) -> list[dict[str, int]]:
        """The estimated tokens of each range of requests (first, end), by the model they run on: the one
        they name, or for a moderation naming none, the stack's default (the batch's `model`)."""
        per_shard: list[dict[str, int]] = []
        for first, end in ranges:
            by_model: dict[str, int] = {}
            for position in range(first, min(end, len(self.token_estimates))):
                model = self.request_models[position] or self.model
                if model is not None:
                    by_model[model] = by_model.get(model, 0) + self.token_estimates[position]
            per_shard.append(by_model)
        return per_shard


def file_error(message: str, code: str = "invalid_request", param: str | None = "input_file_id") -> BatchError:
    """An error about the input file as a whole."""
    return BatchError(code=code, line=None, message=message, param=param)


def line_error(code: str, line: int, message: str, param: str | None = None) -> BatchError:
    return BatchError(code=code, line=line, message=message, param=param)


def _json_problem(exc: ValueError) -> str:
    """What a decoder error says, in a bounded message."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return str(exc)[:200]


NOT_JSON_MESSAGE = "This line is not parseable as valid JSON."
TOO_DEEP_MESSAGE = f"This line nests objects and arrays more than {MAX_JSON_DEPTH} deep."


def read_line(raw: bytes, line: int) -> Any:
    """The JSON value of one line, or an invalid_json_line error saying why it cannot be read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return line_error("invalid_json_line", line, "This line is not valid UTF-8.")
    if too_deep(raw):
        return line_error("invalid_json_line", line, TOO_DEEP_MESSAGE)
    try:
        data = DECODER.decode(text)
    except RecursionError:  # not expected after the depth check, but it must never escape
        return line_error("invalid_json_line", line, TOO_DEEP_MESSAGE)
    except ValueError as exc:
        # OpenAI's sentence first, for clients that match on it; then where the parser stopped.
        return line_error("invalid_json_line", line, f"{NOT_JSON_MESSAGE} {_json_problem(exc)}.")
    # Strict UTF-8 decoding refuses encoded surrogates, so only lines with a surrogate escape need the full check.
    if _SURROGATE_ESCAPE.search(raw) and not is_valid_unicode(data):
        message = "This line holds a \\ud800-\\udfff escape without its pair, which is not valid Unicode."
        return line_error("invalid_json_line", line, message)
    return data


def check_line(raw: bytes, line: int, endpoint: str) -> RequestLine | BatchError:
    """Parse and check one line of the input file."""
    data = read_line(raw, line)
    if isinstance(data, BatchError):
        return data
    if not isinstance(data, dict):
        return line_error("invalid_json_line", line, "Each line must be a JSON object.")
    for name, kind in TOP_LEVEL_FIELDS.items():
        if name not in data:
            return line_error("missing_required_parameter", line, f"Missing required parameter: '{name}'.", name)
        if not isinstance(data[name], kind):
            return line_error("invalid_request", line, f"'{name}' must be a {kind.__name__}.", name)
    if not 0 < len(data["custom_id"]) <= MAX_CUSTOM_ID_CHARS:
        message = f"'custom_id' must be 1 to {MAX_CUSTOM_ID_CHARS} characters long."
        return line_error("invalid_request", line, message, "custom_id")
    if data["method"] != "POST":
        return line_error("invalid_request", line, "'method' must be 'POST'.", "method")
    if data["url"] != endpoint:
        message = f"The url {quoted(data['url'])} does not match the batch endpoint {quoted(endpoint)}."
        return line_error("invalid_url", line, message, "url")
    body = data["body"]
    if body.get("stream") is True:
        return line_error("streaming_unsupported", line, "Streaming is not supported in batches.", "body.stream")
    if endpoint == "/v1/responses" and body.get("background") is True:  # a batch is the background itself
        message = "Background mode is not supported in batches."
        return line_error("invalid_request", line, message, "body.background")
    optional = OPTIONAL_BODY_FIELDS.get(endpoint, {})
    for name, kinds in {**REQUIRED_BODY_FIELDS[endpoint], **optional}.items():
        if body.get(name) is None and name in optional:  # absent or null: the endpoint's default
            continue
        if name not in body:
            return line_error("invalid_request", line, f"Missing required field 'body.{name}'.", f"body.{name}")
        if not isinstance(body[name], kinds) or isinstance(body[name], bool):
            return line_error("invalid_request", line, f"'body.{name}' has the wrong type.", f"body.{name}")
    return RequestLine(line=line, custom_id=data["custom_id"], body=body)


def checked_line(raw: bytes, line: int, endpoint: str) -> RequestLine | BatchError:
    """`check_line`, except that an unexpected failure fails this line rather than the whole job."""
    try:
        return check_line(raw, line, endpoint)
    except MemoryError:
        raise
    except Exception:
        return line_error("invalid_json_line", line, "This line could not be read as a request.")


def _input_count(value: str | list[Any]) -> int:
    """How many inputs an embeddings body holds: a list of strings or of token lists, or one string or token list."""
    if isinstance(value, list) and value and (isinstance(value[0], str | list)):
        return len(value)
    return 1


def estimated_tokens(estimate: Callable[[dict[str, Any]], int], body: dict[str, Any], raw: bytes) -> int:
    """`estimate(body)`; should it fail on a body nobody foresaw, a quarter of the line's bytes (about
    what text costs), so that an estimate never fails a batch's validation."""
    try:
        return max(0, estimate(body))
    except Exception:
        return len(raw) // 4


def parse_input(content: bytes, endpoint: str, estimate: Callable[[dict[str, Any]], int] | None = None) -> ParsedInput:
    """Check every line of a JSONL input file for a batch on `endpoint`; with `estimate`, also estimate
    the input tokens of every valid request's body (token_estimates.py)."""
    parsed = ParsedInput(index=InputIndex(content=content))
    if endpoint not in REQUIRED_BODY_FIELDS:
        parsed.errors.append(file_error(f"The endpoint {quoted(endpoint)} is not supported.", param="endpoint"))
        return parsed
    if len(content) > MAX_FILE_BYTES:
        parsed.errors.append(file_error(f"The input file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB."))
        return parsed
    seen_ids: set[str] = set()
    problems = 0
    requests = 0
    embedding_inputs = 0
    line = 0
    start = len(BYTE_ORDER_MARK) if content.startswith(BYTE_ORDER_MARK) else 0  # written by Windows editors
    while start < len(content):
        end = content.find(b"\n", start)
        end = len(content) if end < 0 else end
        line += 1
        raw = content[start:end]
        line_start, start = start, end + 1
        if not raw.strip():
            continue
        requests += 1
        if requests > MAX_REQUESTS:
            parsed.errors.append(file_error(f"The input file holds more than {MAX_REQUESTS} requests."))
            return parsed
        result = checked_line(raw, line, endpoint)
        if isinstance(result, RequestLine) and result.custom_id in seen_ids:
            message = f"The custom_id {quoted(result.custom_id)} appears more than once."
            result = line_error("duplicate_custom_id", line, message, "custom_id")
        if isinstance(result, BatchError):
            problems += 1
            if problems <= MAX_LISTED_ERRORS:
                parsed.errors.append(result)
            continue
        if endpoint == "/v1/embeddings":
            embedding_inputs += _input_count(result.body["input"])
            if embedding_inputs > MAX_EMBEDDING_INPUTS:
                message = f"An embeddings batch holds at most {MAX_EMBEDDING_INPUTS} inputs over all its lines."
                parsed.errors.append(file_error(message))
                return parsed
        seen_ids.add(result.custom_id)
        parsed.custom_ids.append(result.custom_id)
        parsed.first_line_of_model.setdefault(result.model, line)
        parsed.index.add(line_start, end, line)
        if estimate is not None:
            parsed.token_estimates.append(estimated_tokens(estimate, result.body, raw))
            parsed.request_models.append(result.model)
    if problems > MAX_LISTED_ERRORS:
        parsed.errors.append(file_error(f"{problems - MAX_LISTED_ERRORS} more invalid lines are not listed.", None))
    if not parsed.errors and not len(parsed.index):
        parsed.errors.append(file_error("The input file is empty."))
    parsed.model = next(iter(parsed.first_line_of_model), None)  # the first line's
    return parsed
