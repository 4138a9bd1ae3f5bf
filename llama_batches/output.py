"""What the commands write and say: result files in input order, the summary of a finished batch and its
exit status, batches as JSON or tables. Results go to stdout, notes to stderr."""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from openai.types import Batch
from rich.table import Table

from llama_batches import client as api
from llama_batches import jsonl
from llama_batches.console import Console
from llama_batches.progress import counts

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for any program whose reader quit early
ERROR_MODES = ("include", "separate", "drop")


def note(message: str) -> None:
    """Something the user should know, on stderr (stdout holds results only)."""
    click.echo(message, err=True)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def batch_json(batch: Batch) -> dict[str, Any]:
    return batch.model_dump(mode="json")


def exit_code_for(batch: Batch, failed: int) -> int:
    if batch.status != "completed":
        return EXIT_ERROR
    return EXIT_SOME_FAILED if failed else EXIT_OK


# Writing results.


@dataclass(frozen=True)
class Outcome:
    """What was written for a finished batch."""

    output: Path
    errors_output: Path | None
    succeeded: int
    failed: int  # requests without a successful result, missing ones included
    missing: int
    lines: int
    first_failure: str | None = None  # the first failed request in input order, as jsonl.failure_summary says it


def errors_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


def check_writable(output: Path) -> None:
    """Fail before the batch runs, not after, when its results could not be written."""
    if not output.parent.is_dir():
        raise api.CliError(f"cannot write {output}: no directory {output.parent}")
    if output.is_dir():
        raise api.CliError(f"cannot write {output}: it is a directory")


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write a JSONL file whole or not at all: to a temporary name, then renamed over `path`."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        raise api.CliError(f"cannot write {path}: {error.strerror or error}") from None


def save_results(
    conn: api.Connection, batch: Batch, custom_ids: Sequence[str] | None, output: Path, mode: str
) -> Outcome:
    """Download a batch's result files and write them to `output`: in input order when the input's
    custom_ids are known, else as the server wrote them (output file, then error file)."""
    output_lines, error_lines = download_results(conn, batch)
    return write_results(batch, custom_ids, output_lines, error_lines, output, mode)


def download_results(conn: api.Connection, batch: Batch) -> tuple[list[str], list[str]]:
    """A batch's output and error lines (none for a file it did not write)."""
    with api.readable_errors(conn.base_url):
        return api.download_lines(conn.client, batch.output_file_id), api.download_lines(
            conn.client, batch.error_file_id
        )


def write_results(
    batch: Batch,
    custom_ids: Sequence[str] | None,
    output_lines: Sequence[str],
    error_lines: Sequence[str],
    output: Path,
    mode: str,
) -> Outcome:
    """Write result lines to `output` (and its .errors sibling with mode `separate`), as `save_results` says."""
    ids = list(custom_ids or [])
    every = jsonl.merge_in_input_order(ids, output_lines, error_lines, include_errors=True)
    # With the input known, the first len(ids) lines are its requests, one each; without, every line counts.
    counted = every[: len(ids)] if custom_ids else every
    succeeded = sum(jsonl.is_success(line) for line in counted)
    if custom_ids:
        answered = {*_ids_of(output_lines), *_ids_of(error_lines)}
        total = len(ids)
        missing = sum(custom_id not in answered for custom_id in ids)
    else:  # without the input, the server's count of requests tells how many have no line
        total = max(len(counted), counts(batch)[2])
        missing = total - len(counted)
    errors_output = None
    if mode == "include":
        written = every
    else:
        written = jsonl.merge_in_input_order(ids, output_lines, error_lines, include_errors=False)
        if mode == "separate":
            errors_output = errors_path(output)
            write_lines(errors_output, jsonl.failures_in_input_order(ids, output_lines, error_lines))
    write_lines(output, written)
    first_failure = next(filter(None, map(jsonl.failure_summary, counted)), None)
    return Outcome(output, errors_output, succeeded, total - succeeded, missing, len(written), first_failure)


def _ids_of(lines: Sequence[str]) -> list[str]:
    ids = []
    for line in lines:
        try:
            ids.append(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


# Reporting outcomes.


def batch_errors(batch: Batch) -> str:
    """Why a batch failed, in one line: its first error, "line N: code: message", and how many more it has."""
    errors = batch.errors.data if batch.errors and batch.errors.data else []
    if not errors:
        return "the server gave no reason"
    first = errors[0]
    where = f"line {first.line}: " if first.line else ""
    code = f"{first.code}: " if first.code else ""
    message = " ".join((first.message or "no message").split())  # one line, whatever the server wrote
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}{code}{message}{more}"


def say_first_failure(summary: str | None) -> None:
    """On stderr, why requests failed: the first failure's custom_id, code and message (jsonl.failure_summary)."""
    if summary:
        note(f"First failure: {summary}")


def report(batch: Batch, outcome: Outcome | None, as_json: bool, extra: dict[str, Any] | None = None) -> int:
    """Say how a finished batch went (stdout: summary or JSON; stderr: why not a success); its exit status."""
    if outcome is None:  # a failed batch has no results
        if as_json:
            emit_json({**(extra or {}), "batch": batch_json(batch)})
        raise api.CliError(f"batch {batch.id} failed: {batch_errors(batch)}")
    if as_json:
        emit_json(
            {
                **(extra or {}),
                "batch": batch_json(batch),
                "output": str(outcome.output),
                "errors_output": str(outcome.errors_output) if outcome.errors_output else None,
                "succeeded": outcome.succeeded,
                "failed": outcome.failed,
                "missing": outcome.missing,
            }
        )
    else:
        where = f"; failures in {outcome.errors_output}" if outcome.errors_output else ""
        click.echo(
            f"Batch {batch.id} {batch.status}: {outcome.succeeded} succeeded, {outcome.failed} failed. "
            f"Wrote {outcome.lines} lines to {outcome.output}{where}."
        )
    if outcome.failed:
        say_first_failure(outcome.first_failure)
    if batch.status != "completed":
        note(f"error: batch {batch.id} {batch.status}: {outcome.missing} of its requests have no result")
    return exit_code_for(batch, outcome.failed)


def finish(
    conn: api.Connection,
    batch: Batch,
    custom_ids: Sequence[str] | None,
    output: Path,
    mode: str,
    as_json: bool,
    extra: dict[str, Any] | None = None,
) -> int:
    """Write a finished batch's results (a failed batch has none) and report them; the exit status."""
    outcome = None if batch.status == "failed" else save_results(conn, batch, custom_ids, output, mode)
    return report(batch, outcome, as_json, extra)


# Printing batches.


def _timestamp(value: int | None) -> str:
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds") if value else ""


def table_console() -> Console:
    """Stdout for tables: a terminal's width, or wide enough for whole ids when piped (rich assumes 80)."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def _estimate(batch: Batch) -> str:
    """The estimated input tokens a server with a token quota reports (`estimated_input_tokens`)."""
    estimate = (batch.model_extra or {}).get("estimated_input_tokens")
    return f"{estimate:,}" if isinstance(estimate, int) else ""


def print_batch(batch: Batch) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # ids and keys are copied from here: wrapped, never cut short
    completed, failed, total = counts(batch)
    rows = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("model", batch.model or ""),
        ("requests", f"{completed} completed, {failed} failed, {total} total"),
        ("input tokens (estimate)", _estimate(batch)),
        ("created", _timestamp(batch.created_at)),
        ("expires", _timestamp(batch.expires_at)),
        ("ended", _timestamp(batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at)),
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id or ""),
        ("error file", batch.error_file_id or ""),
    ]
    metadata = dict(batch.metadata or {})
    rows.append(("idempotency key", metadata.pop(api.KEY_FIELD, "")))
    metadata.pop(api.FINGERPRINT_FIELD, None)  # the derived key: only for comparisons, noise on screen
    rows += [(f"metadata {name}", value) for name, value in metadata.items()]
    if batch.status == "failed":
        rows.append(("errors", batch_errors(batch)))
    for name, value in rows:
        if value:
            table.add_row(f"[bold]{name}", str(value))
    table_console().print(table)


def print_batches(batches: Sequence[Batch]) -> None:
    """Batches as a table, one row each."""
    table = Table(box=None, pad_edge=False)
    for column in ("id", "status", "endpoint", "created", "done/total", "failed"):
        justify = "right" if column in {"done/total", "failed"} else "left"
        table.add_column(column, justify=justify, no_wrap=column in {"id", "status"})
    for batch in batches:
        completed, failed, total = counts(batch)
        table.add_row(
            batch.id,
            batch.status,
            batch.endpoint,
            _timestamp(batch.created_at),
            f"{completed + failed}/{total}",
            str(failed),
        )
    table_console().print(table)
