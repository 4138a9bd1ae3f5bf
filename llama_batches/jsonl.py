"""Batch files as data: checking an input file before upload, the idempotency key of a run, and
putting results back in input order. Pure functions: no I/O except `check_input` reading a path."""

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BYTE_ORDER_MARK = b"\xef\xbb\xbf"
MAX_LISTED_PROBLEMS = 5
KEY_PREFIX = "llama-batches-"


class InputError(ValueError):
    """An input file the Batch API would refuse, found before anything is uploaded."""


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON: a server (or a backend) would refuse the line.
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _numbered_lines(content: bytes) -> Iterable[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file with their 1-based line numbers (blank lines still count)."""
    if content.startswith(BYTE_ORDER_MARK):  # editors on Windows write one; servers skip it too
        content = content[len(BYTE_ORDER_MARK) :]
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if raw.strip():
            yield number, raw


def _line_problem(raw: bytes, seen_ids: set[str]) -> str | None:
    """What is wrong with one non-blank line, or None; adds a good line's custom_id to `seen_ids`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return "not valid JSON (nested too deeply)"
    except ValueError as exc:  # from _refuse_constant, or an integer too long to convert
        return f"not valid JSON ({str(exc)[:100]})"
    if not isinstance(data, dict):
        return "not a JSON object"
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id must be a non-empty string"
    if custom_id in seen_ids:
        return f"custom_id {json.dumps(custom_id)[:80]} appears more than once"
    seen_ids.add(custom_id)
    if data.get("method") != "POST":
        return 'method must be "POST"'
    if not isinstance(data.get("url"), str) or not data["url"]:
        return "url must be a non-empty string such as /v1/chat/completions"
    if not isinstance(data.get("body"), dict):
        return "body must be a JSON object"
    return None


def check_input(source: Path | str | bytes, limit: int = MAX_LISTED_PROBLEMS) -> list[str]:
    """The problems of a batch input file, as "line N: what" messages: the first `limit`, then how
    many more. Empty when every non-blank line is a request object with a unique custom_id, a
    method, a url and a body. Never raises on any content (reading a path can raise OSError)."""
    content = source if isinstance(source, bytes) else Path(source).read_bytes()
    problems: list[str] = []
    seen_ids: set[str] = set()
    count = 0
    requests = 0
    for number, raw in _numbered_lines(content):
        requests += 1
        problem = _line_problem(raw, seen_ids)
        if problem is None:
            continue
        count += 1
        if count <= limit:
            problems.append(f"line {number}: {problem}")
    if count > limit:
        problems.append(f"{count - limit} more invalid lines")
    if requests == 0:
        problems.append("the file holds no requests")
    return problems


def request_lines(content: bytes) -> list[bytes]:
    """The non-blank lines of an input file as they are written (CRLF's CR included), in file order."""
    return [raw for _, raw in _numbered_lines(content)]


def parse_lines(content: bytes) -> list[dict[str, Any]]:
    """The request objects of an input file that `check_input` passed, in file order."""
    return [_DECODER.decode(raw.decode("utf-8")) for _, raw in _numbered_lines(content)]


def endpoint_of(lines: Sequence[Mapping[str, Any]]) -> str:
    """The url every request shares: a batch runs one endpoint. InputError if they differ or there are none."""
    if not lines:
        raise InputError("the file holds no requests")
    first = lines[0].get("url")
    for position, line in enumerate(lines, start=1):
        if line.get("url") != first:
            raise InputError(
                f"request {position} has url {line.get('url')!r} but the first has {first!r}: "
                "a batch runs one endpoint, so split the file by url"
            )
    return str(first)


def idempotency_key(content: bytes, endpoint: str, completion_window: str, metadata: Mapping[str, str] | None) -> str:
    """A key naming this run: a SHA-256 of the file content and the batch parameters. The same file
    and options give the same key, so running a command again finds the batch it created."""
    # Canonical JSON (sorted keys, no spaces), so the key does not depend on the order flags were given.
    parameters = {
        "content_sha256": hashlib.sha256(content).hexdigest(),
        "endpoint": endpoint,
        "completion_window": completion_window,
        "metadata": dict(sorted((metadata or {}).items())),
    }
    canonical = json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:40]


def missing_result_line(custom_id: str) -> str:
    """The line written for a request that neither result file answers (a cancelled or expired batch)."""
    error = {"code": "missing_result", "message": "The batch returned no result for this request."}
    return json.dumps({"id": None, "custom_id": custom_id, "response": None, "error": error})


def _by_custom_id(lines: Iterable[str], extras: list[str]) -> dict[str, str]:
    """Result lines by custom_id, the first of each; lines without a readable custom_id go to `extras`."""
    found: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            custom_id = json.loads(line).get("custom_id")
        except (ValueError, AttributeError, RecursionError):
            custom_id = None
        if not isinstance(custom_id, str):
            extras.append(line)
        elif custom_id not in found:  # a repeat would answer a request twice: the first one stands
            found[custom_id] = line
    return found


def _leftovers(answers: Mapping[str, str], known: set[str]) -> list[str]:
    return [line for custom_id, line in answers.items() if custom_id not in known]


def merge_in_input_order(
    custom_ids_in_input_order: Sequence[str],
    output_lines: Iterable[str],
    error_lines: Iterable[str],
    include_errors: bool,
) -> list[str]:
    """Result lines in the order of the input's requests.

    With `include_errors`, exactly one line per request: its output line, else its error line, else
    a `missing_result` error line. Without, only the requests the output file answers. Lines for
    custom_ids the input does not hold (or unreadable ones) come last, in file order, so nothing the
    server returned is lost.
    """
    extras: list[str] = []
    outputs = _by_custom_id(output_lines, extras)
    errors = _by_custom_id(error_lines, extras if include_errors else [])
    merged: list[str] = []
    for custom_id in custom_ids_in_input_order:
        if custom_id in outputs:
            merged.append(outputs[custom_id])
        elif include_errors:
            merged.append(errors.get(custom_id) or missing_result_line(custom_id))
    known = set(custom_ids_in_input_order)
    merged += _leftovers(outputs, known)
    if include_errors:
        merged += _leftovers(errors, known)
    return merged + extras


def failures_in_input_order(
    custom_ids_in_input_order: Sequence[str], output_lines: Iterable[str], error_lines: Iterable[str]
) -> list[str]:
    """The lines `merge_in_input_order` adds with `include_errors`: one per request the output file does
    not answer (its error line, or `missing_result`), in input order; then error lines of unknown requests."""
    extras: list[str] = []
    outputs = _by_custom_id(output_lines, [])
    errors = _by_custom_id(error_lines, extras)
    failed = [
        errors.get(custom_id) or missing_result_line(custom_id)
        for custom_id in custom_ids_in_input_order
        if custom_id not in outputs
    ]
    return failed + _leftovers(errors, set(custom_ids_in_input_order)) + extras


def is_success(line: str) -> bool:
    """Whether a result line is a 2xx response without an error."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or data.get("error"):
        return False
    response = data.get("response")
    return (
        isinstance(response, dict)
        and isinstance(response.get("status_code"), int)
        and (200 <= response["status_code"] < 300)
    )


MAX_FAILURE_CHARS = 300  # a server's message may be long (a backend's whole answer): the summary is one screen line


def failure_summary(line: str) -> str | None:
    """A failed result line in one line, "<custom_id>: <code>: <message>"; None for a success.

    The code is the error's own; for a request the model refused with an HTTP status, that status
    comes first ("HTTP 400 invalid_request_error: ..."), as the code alone (often null) may say nothing.
    """
    if is_success(line):
        return None
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return f"an unreadable result line: {' '.join(line.split())[:MAX_FAILURE_CHARS]}"
    if not isinstance(data, dict):
        return "a result line that is not a JSON object"
    error, response = data.get("error"), data.get("response")
    status = response.get("status_code") if isinstance(response, dict) else None
    if not (isinstance(error, dict) and error) and isinstance(response, dict):
        body = response.get("body")
        error = body.get("error", body) if isinstance(body, dict) else {"message": body}
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or error.get("type")
    what = " ".join(str(part) for part in (f"HTTP {status}" if status else None, code) if part) or "error"
    message = " ".join(str(error.get("message") or "no message").split())
    summary = f"{data.get('custom_id')}: {what}: {message}"
    return summary if len(summary) <= MAX_FAILURE_CHARS else summary[: MAX_FAILURE_CHARS - 3] + "..."
