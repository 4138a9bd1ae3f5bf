"""Re-running what an ended batch did not finish: which of its requests a new batch runs again, and one
output that combines the first batch's results with the new ones. Pure functions over result lines.

A request runs again when it has no result, when its batch ended before it ran (`batch_expired`,
`batch_cancelled`, `input_file_unavailable`, or this tool's `missing_result`), or when it failed in
a way a later attempt may cure: the backend's 5xx, 408 or 429 after every retry, a timeout, a
connection error, or a batch resumed without its per-request credentials. Never when the request
itself was refused (any other 4xx: the same request would be refused again), nor when it succeeded,
nor on an `internal_error` (the stack failed on the request itself, without a status to tell
whether it would again).
"""

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_batches import jsonl

# A result's error code -> why it runs again; codes not listed are final.
RETRIED_CODES = {
    "batch_expired": "expired",
    "batch_cancelled": "cancelled",
    "missing_result": "without a result",
    "timeout": "timed out",
    "connection_error": "connection errors",
    "credentials_unavailable": "credentials unavailable",
    "input_file_unavailable": "input file unavailable",  # never sent: the server lost the input (--input)
}
RETRIED_STATUSES = {408: "timed out", 429: "rate limited"}  # and every 5xx: "server errors"
MISSING = "without a result"
RERUN_OF_FIELD = "llama_batches_rerun_of"  # metadata of a re-run batch: the batch it runs again


def _custom_id(line: str) -> str | None:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def why_run_again(result: str | None) -> str | None:
    """Why a request with this result line (None: no line) runs again; None if its result stands."""
    if result is None:
        return MISSING
    try:
        data: Any = json.loads(result)
    except (ValueError, RecursionError):
        return MISSING  # a line nobody can read answers nothing
    if not isinstance(data, dict):
        return MISSING
    error, response = data.get("error"), data.get("response")
    if isinstance(error, dict) and error:
        return RETRIED_CODES.get(str(error.get("code")))
    status = response.get("status_code") if isinstance(response, dict) else None
    if not isinstance(status, int):
        return MISSING
    if status >= 500:
        return "server errors"
    return RETRIED_STATUSES.get(status)


def results_by_custom_id(output_lines: Iterable[str], error_lines: Iterable[str]) -> dict[str, str]:
    """Each request's result line: its output line, else its error line (the first of each)."""
    results: dict[str, str] = {}
    for line in [*output_lines, *error_lines]:
        custom_id = _custom_id(line)
        if custom_id is not None and custom_id not in results:
            results[custom_id] = line
    return results


@dataclass(frozen=True)
class Selection:
    """The requests of an input file to run again, and why."""

    custom_ids: list[str]  # every request of the input, in input order
    lines: list[bytes]  # the input lines to run again, as the file has them, in input order
    again: list[str]  # their custom_ids
    reasons: Counter[str]

    def input_file(self) -> bytes:
        return b"".join(line + b"\n" for line in self.lines)

    def summary(self) -> str:
        """`12 expired, 3 server errors` (most common first)."""
        return ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())


def foreign_results(custom_ids: Sequence[str], output_lines: Sequence[str], error_lines: Sequence[str]) -> int:
    """How many results answer custom_ids the input does not hold: not 0 means it is another batch's input."""
    known = set(custom_ids)
    return sum(1 for custom_id in results_by_custom_id(output_lines, error_lines) if custom_id not in known)


def select(content: bytes, output_lines: Sequence[str], error_lines: Sequence[str]) -> Selection:
    """The requests of input file `content` (checked by jsonl.check_input) whose results do not stand."""
    results = results_by_custom_id(output_lines, error_lines)
    custom_ids: list[str] = []
    lines: list[bytes] = []
    again: list[str] = []
    reasons: Counter[str] = Counter()
    for raw, request in zip(jsonl.request_lines(content), jsonl.parse_lines(content), strict=True):
        custom_id = request["custom_id"]
        custom_ids.append(custom_id)
        reason = why_run_again(results.get(custom_id))
        if reason is not None:
            lines.append(raw)
            again.append(custom_id)
            reasons[reason] += 1
    return Selection(custom_ids, lines, again, reasons)


def combine(
    again: Sequence[str],
    first: tuple[Sequence[str], Sequence[str]],
    rerun: tuple[Sequence[str], Sequence[str]],
) -> tuple[list[str], list[str]]:
    """The output and error lines of both batches, where a request run `again` that the new batch
    answered takes the new answer, and one it did not answer keeps the first (its expiry, say)."""
    answered = set(results_by_custom_id(*rerun))
    replaced = set(again) & answered

    def kept(lines: Sequence[str]) -> list[str]:
        return [line for line in lines if _custom_id(line) not in replaced]

    return kept(first[0]) + list(rerun[0]), kept(first[1]) + list(rerun[1])
