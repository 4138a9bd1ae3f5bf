"""Reading a batch input file: JSONL lines into requests, or OpenAI's validation errors. Pure functions.

One bad line fails the whole batch, as OpenAI does; `errors` lists the first MAX_LISTED_ERRORS
problems, and a last entry says how many more there were.
"""

import json
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
class ParsedInput:
    """The requests of a file, or the reasons it was refused."""

    requests: list[RequestLine] = field(default_factory=list)
    errors: list[BatchError] = field(default_factory=list)

    @property
    def models(self) -> set[str]:
        return {request.model for request in self.requests}


def file_error(message: str, code: str = "invalid_request", param: str | None = "input_file_id") -> BatchError:
    """An error about the input file as a whole."""
    return BatchError(code=code, line=None, message=message, param=param)


def check_line(raw: bytes, line: int, endpoint: str) -> RequestLine | BatchError:
    """Parse and check one line of the input file."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return BatchError(code="invalid_json_line", line=line, message="This line is not valid UTF-8 JSON.")
    if not isinstance(data, dict):
        return BatchError(code="invalid_json_line", line=line, message="Each line must be a JSON object.")
    for name, kind in TOP_LEVEL_FIELDS.items():
        if name not in data:
            return BatchError(
                code="missing_required_parameter",
                line=line,
                param=name,
                message=f"Missing required parameter: '{name}'.",
            )
        if not isinstance(data[name], kind):
            return BatchError(
                code="invalid_request", line=line, param=name, message=f"'{name}' must be a {kind.__name__}."
            )
    if data["method"] != "POST":
        return BatchError(code="invalid_request", line=line, param="method", message="'method' must be 'POST'.")
    if data["url"] != endpoint:
        return BatchError(
            code="invalid_url",
            line=line,
            param="url",
            message=f"The url {data['url']!r} does not match the batch endpoint {endpoint!r}.",
        )
    body = data["body"]
    if body.get("stream") is True:
        return BatchError(
            code="streaming_unsupported",
            line=line,
            param="body.stream",
            message="Streaming is not supported in batches.",
        )
    for name, kinds in REQUIRED_BODY_FIELDS[endpoint].items():
        if name not in body:
            return BatchError(
                code="invalid_request",
                line=line,
                param=f"body.{name}",
                message=f"Missing required field 'body.{name}'.",
            )
        if not isinstance(body[name], kinds) or isinstance(body[name], bool):
            return BatchError(
                code="invalid_request", line=line, param=f"body.{name}", message=f"'body.{name}' has the wrong type."
            )
    return RequestLine(line=line, custom_id=data["custom_id"], body=body)


def parse_input(content: bytes, endpoint: str) -> ParsedInput:
    """Check every line of a JSONL input file for a batch on `endpoint`."""
    parsed = ParsedInput()
    if len(content) > MAX_FILE_BYTES:
        parsed.errors.append(file_error(f"The input file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB."))
        return parsed
    seen_ids: set[str] = set()
    problems = 0
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        result = check_line(raw, number, endpoint)
        if isinstance(result, RequestLine) and result.custom_id in seen_ids:
            result = BatchError(
                code="duplicate_custom_id",
                line=number,
                param="custom_id",
                message=f"The custom_id {result.custom_id!r} appears more than once.",
            )
        if isinstance(result, BatchError):
            problems += 1
            if problems <= MAX_LISTED_ERRORS:
                parsed.errors.append(result)
            continue
        seen_ids.add(result.custom_id)
        parsed.requests.append(result)
    if problems > MAX_LISTED_ERRORS:
        parsed.errors.append(
            file_error(f"{problems - MAX_LISTED_ERRORS} more invalid lines are not listed.", param=None)
        )
    if not parsed.errors and not parsed.requests:
        parsed.errors.append(file_error("The input file is empty."))
    if len(parsed.requests) > MAX_REQUESTS:
        parsed.errors.append(file_error(f"The input file holds more than {MAX_REQUESTS} requests."))
    return parsed
