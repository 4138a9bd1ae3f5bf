"""Results of requests: how they are accounted, kept in storage, and assembled into result files.

Pure functions. A stored chunk is text, one entry a line: `<position>\t<1|0>\t<result line JSON>`
(1 for a success; JSON never holds a raw tab or newline), so assembling files copies result lines
without parsing them again. Positions count requests in file order, so files come out in input order.
"""

import json
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from openai.types.batch_request_counts import BatchRequestCounts
from openai.types.batch_usage import BatchUsage, InputTokensDetails, OutputTokensDetails

from .formats import token_usage


@dataclass(frozen=True, slots=True)
class ResultEntry:
    """The result of one request: its position among the file's requests, and its result line."""

    position: int
    ok: bool
    line_json: str


def encode_results(entries: Iterable[ResultEntry]) -> str:
    return "".join(f"{e.position}\t{int(e.ok)}\t{e.line_json}\n" for e in entries)


def decode_results(text: str) -> list[ResultEntry]:
    entries = []
    # Split on "\n" only: str.splitlines would also split at U+2028 and the like, which a line may hold raw.
    for row in text.split("\n"):
        if not row:
            continue
        position, ok, line_json = row.split("\t", 2)
        entries.append(ResultEntry(int(position), ok == "1", line_json))
    return entries


def success_tokens(line_json: str) -> tuple[int, int]:
    """(input, output) tokens of a stored success line; (0, 0) when it cannot be read, so a tally never fails."""
    try:
        line = json.loads(line_json)
    except (ValueError, RecursionError):  # e.g. an integer longer than Python reads, in an answer
        return 0, 0
    response = line.get("response") if isinstance(line, dict) else None
    return token_usage(response.get("body") if isinstance(response, dict) else None)


@dataclass
class Tally:
    """Counts and token usage of results."""

    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add_success(self, input_tokens: int, output_tokens: int) -> None:
        self.completed += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def add_failure(self) -> None:
        self.failed += 1

    def merge(self, other: "Tally") -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens

    @classmethod
    def of(cls, entries: Iterable[ResultEntry]) -> "Tally":
        """The tally of stored results (parses the success lines for their token usage)."""
        tally = cls()
        for entry in entries:
            if entry.ok:
                tally.add_success(*success_tokens(entry.line_json))
            else:
                tally.add_failure()
        return tally

    def counts(self, total: int) -> BatchRequestCounts:
        return BatchRequestCounts(total=total, completed=self.completed, failed=self.failed)

    def usage(self) -> BatchUsage:
        return BatchUsage(
            input_tokens=self.input_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=0),
            output_tokens=self.output_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
            total_tokens=self.input_tokens + self.output_tokens,
        )


class ResultSpool:
    """Result lines parked in a temporary file, then copied into the result files in position order.

    Memory holds three numbers per request rather than the lines, so building the files of a
    50,000-request batch costs about 1 MB, whatever the size of the answers. A position added twice
    keeps its first line (a request run twice, on two servers, counts once).
    """

    def __init__(self, total: int, parking: BinaryIO) -> None:
        self._file = parking
        self._offsets = array("q", [-1]) * total
        self._lengths = array("q", [0]) * total
        self._ok = bytearray(total)

    def add(self, entries: Iterable[ResultEntry]) -> list[ResultEntry]:
        """Park the entries of positions not parked yet; return those kept."""
        kept = []
        for entry in entries:
            if not 0 <= entry.position < len(self._offsets) or self._offsets[entry.position] >= 0:
                continue  # a position outside the batch cannot be a result of it
            data = entry.line_json.encode() + b"\n"
            self._offsets[entry.position] = self._file.tell()
            self._lengths[entry.position] = len(data)
            self._ok[entry.position] = entry.ok
            self._file.write(data)
            kept.append(entry)
        return kept

    def missing(self) -> list[int]:
        """The positions that have no result yet."""
        return [position for position, offset in enumerate(self._offsets) if offset < 0]

    def write_files(self, output: BinaryIO, error: BinaryIO) -> tuple[int, int]:
        """Write every parked line to `output` (successes) or `error`; return (successes, failures)."""
        completed = failed = 0
        for position, offset in enumerate(self._offsets):
            if offset < 0:
                continue
            self._file.seek(offset)
            data = self._file.read(self._lengths[position])
            if self._ok[position]:
                output.write(data)
                completed += 1
            else:
                error.write(data)
                failed += 1
        return completed, failed
