"""Reading a batch input file: JSONL lines into an index of requests, or OpenAI's validation errors.

Pure functions. A scan checks each line and keeps only where it lies in the raw bytes (three
integer arrays), not the parsed line: a request is parsed again when it runs. So a 50,000-line file
costs its raw size plus about 1 MB, not 50,000 dictionaries.

One bad line fails the whole batch, as OpenAI does; `errors` lists the first MAX_LISTED_ERRORS
problems, and a last entry says how many more there were.
"""

import json
from array import array
from dataclasses import dataclass, field
from typing import Any

from openai.types.batch_error import BatchError

MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_LISTED_ERRORS = 100

# The body fields each endpoint needs, with the JSON types they may have.
REQUIRED_BODY_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "/v1/chat/completions": {"model": (str,), "messages": (list,)},
    "/v1/completions": {"model": (str,), "prompt": (str, list)},
    "/v1/embeddings": {"model": (str,), "input": (str, list)},
}
TOP_LEVEL_FIELDS: dict[str, type] = {"custom_id": str, "method": str, "url": str, "body": dict}


@dataclass(frozen=True)
class RequestLine:
    """One valid request of the input file."""

    line: int
    custom_id: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return self.body["model"]


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
        data = json.loads(self.content[self.starts[position] : self.ends[position]])
        return RequestLine(line=self.line_numbers[position], custom_id=data["custom_id"], body=data["body"])


@dataclass
class ParsedInput:
    """The requests of a file and the first line naming each model, or the reasons it was refused."""

    index: InputIndex = field(default_factory=InputIndex)
    errors: list[BatchError] = field(default_factory=list)
    first_line_of_model: dict[str, int] = field(default_factory=dict)


def file_error(message: str, code: str = "invalid_request", param: str | None = "input_file_id") -> BatchError:
    """An error about the input file as a whole."""
    return BatchError(code=code, line=None, message=message, param=param)


def line_error(code: str, line: int, message: str, param: str | None = None) -> BatchError:
    return BatchError(code=code, line=line, message=message, param=param)


def check_line(raw: bytes, line: int, endpoint: str) -> RequestLine | BatchError:
    """Parse and check one line of the input file."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return line_error("invalid_json_line", line, "This line is not valid UTF-8 JSON.")
    if not isinstance(data, dict):
        return line_error("invalid_json_line", line, "Each line must be a JSON object.")
    for name, kind in TOP_LEVEL_FIELDS.items():
        if name not in data:
            return line_error("missing_required_parameter", line, f"Missing required parameter: '{name}'.", name)
        if not isinstance(data[name], kind):
            return line_error("invalid_request", line, f"'{name}' must be a {kind.__name__}.", name)
    if data["method"] != "POST":
        return line_error("invalid_request", line, "'method' must be 'POST'.", "method")
    if data["url"] != endpoint:
        message = f"The url {data['url']!r} does not match the batch endpoint {endpoint!r}."
        return line_error("invalid_url", line, message, "url")
    body = data["body"]
    if body.get("stream") is True:
        return line_error("streaming_unsupported", line, "Streaming is not supported in batches.", "body.stream")
    for name, kinds in REQUIRED_BODY_FIELDS[endpoint].items():
        if name not in body:
            return line_error("invalid_request", line, f"Missing required field 'body.{name}'.", f"body.{name}")
        if not isinstance(body[name], kinds) or isinstance(body[name], bool):
            return line_error("invalid_request", line, f"'body.{name}' has the wrong type.", f"body.{name}")
    return RequestLine(line=line, custom_id=data["custom_id"], body=body)


def parse_input(content: bytes, endpoint: str) -> ParsedInput:
    """Check every line of a JSONL input file for a batch on `endpoint`."""
    parsed = ParsedInput(index=InputIndex(content=content))
    if len(content) > MAX_FILE_BYTES:
        parsed.errors.append(file_error(f"The input file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB."))
        return parsed
    seen_ids: set[str] = set()
    problems = 0
    requests = 0
    line = 0
    start = 0
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
        result = check_line(raw, line, endpoint)
        if isinstance(result, RequestLine) and result.custom_id in seen_ids:
            message = f"The custom_id {result.custom_id!r} appears more than once."
            result = line_error("duplicate_custom_id", line, message, "custom_id")
        if isinstance(result, BatchError):
            problems += 1
            if problems <= MAX_LISTED_ERRORS:
                parsed.errors.append(result)
            continue
        seen_ids.add(result.custom_id)
        parsed.first_line_of_model.setdefault(result.model, line)
        parsed.index.add(line_start, end, line)
    if problems > MAX_LISTED_ERRORS:
        parsed.errors.append(file_error(f"{problems - MAX_LISTED_ERRORS} more invalid lines are not listed.", None))
    if not parsed.errors and not len(parsed.index):
        parsed.errors.append(file_error("The input file is empty."))
    return parsed
