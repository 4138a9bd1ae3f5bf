"""The `llama-batches` commands. Results go to stdout (JSON with --json), notes and progress to stderr,
and every failure to one line on stderr: a script can pipe the one and read the other.

Exit status: 0 every request succeeded; 1 the batch completed but some requests failed; 2 the batch
failed, expired or was cancelled, or any error (bad input, server unreachable, key conflict...);
130 interrupted (the batch keeps running); 141 stdout's reader quit early (`| head`), quietly.
"""

import contextlib
import functools
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import openai
from openai.types import Batch

from llama_batches import client as api
from llama_batches import jsonl
from llama_batches import rerun as reruns
from llama_batches.output import (
    ERROR_MODES,
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    batch_errors,
    batch_json,
    check_writable,
    download_results,
    emit_json,
    exit_code_for,
    finish,
    note,
    print_batch,
    print_batches,
    report,
    say_first_failure,
    write_results,
)
from llama_batches.progress import counts, status_line
from llama_batches.session import (
    Interrupted,
    announce,
    follow,
    plan_batch,
    plan_content,
    read_input,
    start_batch,
)


def one_line(text: object) -> str:
    """A message as one line: whatever a server or the system said may hold line breaks."""
    return " ".join(str(text).split())


def this_command() -> str:
    """The command line as typed, to repeat it (`python -m llama_batches` shown as the script's name)."""
    return shlex.join(["llama-batches", *sys.argv[1:]])


def stop_quietly_on_broken_pipe() -> NoReturn:
    """Exit as a program killed by SIGPIPE would, without a word: the reader (`| head`) has what it wanted."""
    # As Python's docs advise: stdout to devnull, or the flush at exit fails again and prints a traceback.
    with contextlib.suppress(OSError, ValueError):  # ValueError: no file descriptor (output captured in-process)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def reported(command: Callable[..., int | None]) -> Callable[..., NoReturn]:
    """Run a command and exit with its status; any failure becomes one line on stderr and status 2,
    never a traceback (LLAMA_BATCHES_DEBUG=1 shows unexpected ones)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> NoReturn:
        try:
            code = command(*args, **kwargs) or EXIT_OK
            sys.stdout.flush()  # a closed pipe shows here, in time to be handled below
        except BrokenPipeError:
            stop_quietly_on_broken_pipe()
        except api.CliError as error:
            note(f"error: {one_line(error)}")
            code = EXIT_ERROR
        except Interrupted as interruption:
            note(f"interrupted: {one_line(interruption)}")
            code = EXIT_INTERRUPTED
        except KeyboardInterrupt:
            note("interrupted")
            code = EXIT_INTERRUPTED
        except openai.OpenAIError as error:  # a call made outside `readable_errors`: still one line
            note(f"error: {api.describe(error, 'the server')}")
            code = EXIT_ERROR
        except Exception as error:
            if os.environ.get("LLAMA_BATCHES_DEBUG"):
                raise
            note(f"error: unexpected {type(error).__name__}: {one_line(error)} (LLAMA_BATCHES_DEBUG=1 shows where)")
            code = EXIT_ERROR
        sys.exit(code)

    return wrapper


def with_connection(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --base-url and --api-key to a command (they work before the command name too) and pass a Connection."""

    @click.option("--api-key", default=None, help="API key [env: OPENAI_API_KEY; default: none].")
    @click.option(
        "--base-url", default=None, help=f"Batch API base URL [env: OPENAI_BASE_URL; {api.DEFAULT_BASE_URL}]."
    )
    @click.pass_context
    @functools.wraps(command)
    def wrapper(ctx: click.Context, base_url: str | None, api_key: str | None, **kwargs: Any) -> Any:
        top = ctx.find_root().obj or {}
        # An empty variable counts as unset, as it does in a shell's ${VAR:-default}.
        url = base_url or top.get("base_url") or os.environ.get("OPENAI_BASE_URL") or api.DEFAULT_BASE_URL
        key = api_key or top.get("api_key") or os.environ.get("OPENAI_API_KEY") or "none"
        return command(api.Connection(url.rstrip("/"), key), **kwargs)

    return wrapper


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout, for scripts.")(command)


def batch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that define a batch, shared by `run` and `submit`."""
    for option in reversed(
        [
            click.option("--endpoint", default=None, help="Batch endpoint [default: the url all lines share]."),
            click.option("--completion-window", default="24h", show_default=True),
            click.option("--metadata", "metadata_pairs", multiple=True, metavar="KEY=VALUE", help="Repeatable."),
            click.option("--key", default=None, help="Idempotency key [default: derived from the file and options]."),
        ]
    ):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base-url", default=None, help="Batch API base URL [env: OPENAI_BASE_URL].")
@click.option("--api-key", default=None, help="API key [env: OPENAI_API_KEY].")
@click.pass_context
def cli(ctx: click.Context, base_url: str | None, api_key: str | None) -> None:
    """Run OpenAI-compatible batches from JSONL files: llama-stack, OpenAI, any server with the Batch API."""
    ctx.obj = {"base_url": base_url, "api_key": api_key}


# Commands.

errors_option = click.option(
    "--errors",
    "errors_mode",
    type=click.Choice(ERROR_MODES),
    default="include",
    show_default=True,
    help="Failed requests: in OUTPUT at their input position, in OUTPUT's .errors.jsonl sibling, or left out.",
)


def batch_command(*options: Callable[..., Any], **settings: Any) -> Callable[[Callable[..., int]], click.Command]:
    """A command on an existing batch: a BATCH_ID argument, then `options`, --json and the connection options."""

    def decorate(command: Callable[..., Any]) -> click.Command:
        for decorator in (reported, with_connection, json_option, *reversed(options), click.argument("batch_id")):
            command = decorator(command)
        return cli.command(**settings)(command)

    return decorate


def retrieve(conn: api.Connection, batch_id: str) -> Batch:
    """The batch as the server has it now; a failure to get it is one readable error."""
    with api.readable_errors(conn.base_url):
        return api.retrieve(conn.client, batch_id)


def emit_batch(batch: Batch, as_json: bool, show: Callable[[Batch], None] = print_batch) -> None:
    """A batch on stdout: its JSON with --json, for scripts; otherwise as `show` prints it."""
    if as_json:
        emit_json(batch_json(batch))
    else:
        show(batch)


def echo_status_line(batch: Batch) -> None:
    click.echo(status_line(batch))


@cli.command(short_help="Run INPUT as a batch, write results to OUTPUT in input order.")
@click.argument("input_path", metavar="INPUT.jsonl")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="OUTPUT.jsonl")
@batch_options
@errors_option
@json_option
@with_connection
@reported
def run(
    conn: api.Connection,
    input_path: str,
    output: Path,
    endpoint: str | None,
    completion_window: str,
    metadata_pairs: tuple[str, ...],
    key: str | None,
    errors_mode: str,
    as_json: bool,
) -> int:
    """Run INPUT as a batch and write its results to OUTPUT in input order.

    INPUT is checked locally, uploaded and created as a batch, which is followed with a progress bar.

    Running the same command again re-attaches to the batch it created (found by its idempotency
    key) instead of creating another, after Ctrl-C or a lost connection.
    """
    plan = plan_batch(input_path, endpoint, completion_window, metadata_pairs, key)
    check_writable(output)
    again = f"Run the same command again to re-attach: {this_command()}"
    try:
        batch, reattached = start_batch(conn, plan)
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped while creating the batch. {again} (it creates the batch, or finds it if it was created)"
        ) from None
    announce(plan, batch, reattached)
    batch = follow(conn, batch, again)
    extra = {"reattached": reattached, "idempotency_key": plan.key}
    try:
        return finish(conn, batch, plan.custom_ids, output, errors_mode, as_json, extra)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped while saving the results of batch {batch.id}, which has ended. {again}") from None


@cli.command()
@click.argument("input_path", metavar="INPUT.jsonl")
@batch_options
@json_option
@with_connection
@reported
def submit(
    conn: api.Connection,
    input_path: str,
    endpoint: str | None,
    completion_window: str,
    metadata_pairs: tuple[str, ...],
    key: str | None,
    as_json: bool,
) -> int:
    """Create INPUT's batch without waiting; print its id.

    Like `run`, it finds the batch made from the same file and options before instead of making another.
    """
    plan = plan_batch(input_path, endpoint, completion_window, metadata_pairs, key)
    batch, reattached = start_batch(conn, plan)
    announce(plan, batch, reattached)
    emit_batch(batch, as_json, lambda created: click.echo(created.id))
    return EXIT_OK


@batch_command()
def status(conn: api.Connection, batch_id: str, as_json: bool) -> int:
    """Show a batch."""
    emit_batch(retrieve(conn, batch_id), as_json)
    return EXIT_OK


@batch_command()
def wait(conn: api.Connection, batch_id: str, as_json: bool) -> int:
    """Follow a batch until it ends.

    Exit status as for `run`.
    """
    batch = follow(conn, retrieve(conn, batch_id), f"Follow it again with: llama-batches wait {batch_id}")
    emit_batch(batch, as_json, echo_status_line)
    if batch.status == "failed":
        raise api.CliError(f"batch {batch.id} failed: {batch_errors(batch)}")
    failed = counts(batch)[1]
    if failed:
        say_first_failure(first_failure(conn, batch))
    if batch.status != "completed":
        note(f"error: batch {batch.id} {batch.status} before all its requests ran")
    return exit_code_for(batch, failed)


def first_failure(conn: api.Connection, batch: Batch) -> str | None:
    """The first line of a batch's error file, summarised; None if it cannot be read now (the wait itself
    succeeded: a failed download must not turn its answer into an error)."""
    try:
        line = api.first_line(conn.client, batch.error_file_id)
    except openai.OpenAIError:
        return None
    return jsonl.failure_summary(line) if line else None


@batch_command(
    click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="OUTPUT.jsonl"),
    click.option(
        "--input", "input_path", default=None, metavar="INPUT.jsonl", help="The batch's input: write in its order."
    ),
    errors_option,
)
def results(
    conn: api.Connection, batch_id: str, output: Path, input_path: str | None, errors_mode: str, as_json: bool
) -> int:
    """Download a finished batch's results to OUTPUT.

    Exit status as for `run`.
    """
    custom_ids = None
    if input_path is not None:
        content = read_input(Path(input_path))
        problems = jsonl.check_input(content)
        if problems:
            raise api.CliError(f"{input_path}: {'; '.join(problems)}")
        custom_ids = [line["custom_id"] for line in jsonl.parse_lines(content)]
    check_writable(output)
    batch = retrieve(conn, batch_id)
    if batch.status not in api.TERMINAL_STATUSES:
        raise api.CliError(f"batch {batch_id} is {batch.status}: no results yet (llama-batches wait {batch_id})")
    return finish(conn, batch, custom_ids, output, errors_mode, as_json)


@batch_command(
    click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="OUTPUT.jsonl"),
    click.option(
        "--input",
        "input_path",
        default=None,
        metavar="INPUT.jsonl",
        help="The batch's input file, if the server no longer has it [default: downloaded].",
    ),
    click.option("--key", default=None, help="Idempotency key of the new batch [default: derived from its input]."),
    errors_option,
    short_help="Run again what an ended batch did not finish; write one output.",
)
def rerun(
    conn: api.Connection,
    batch_id: str,
    output: Path,
    input_path: str | None,
    key: str | None,
    errors_mode: str,
    as_json: bool,
) -> int:
    """Run again the requests of an ended batch that did not finish, and write OUTPUT: every request of
    the batch once, in input order, the earlier results combined with the new ones.

    Runs again: requests without a result, expired or cancelled ones, and failures a retry may cure
    (5xx, 408, 429, timeouts, connection errors); never a request the model refused (other 4xx).
    Like `run`, it shows progress, and running the same command again re-attaches to the new batch.
    """
    check_writable(output)
    first = retrieve(conn, batch_id)
    if first.status not in api.TERMINAL_STATUSES:
        raise api.CliError(f"batch {batch_id} is {first.status}: re-run it once it has ended (llama-batches wait)")
    content = checked_input(read_input(Path(input_path)), input_path) if input_path else download_input(conn, first)
    first_results = download_results(conn, first)
    selection = reruns.select(content, *first_results)
    total = len(selection.custom_ids)
    expected = counts(first)[2]
    if reruns.foreign_results(selection.custom_ids, *first_results) or (expected and expected != total):
        raise api.CliError(
            f"{input_path or first.input_file_id} is not the input of batch {batch_id}: it holds {total} requests,"
            f" the batch {expected}, and their custom_ids do not match its results"
        )
    if not selection.again:
        raise api.CliError(f"batch {batch_id}: nothing to re-run: every one of its {total} requests has a final result")
    note(f"Re-running {len(selection.again)} of the {total} requests of batch {batch_id}: {selection.summary()}.")
    name = Path(f"rerun-{batch_id}.jsonl")
    metadata = {reruns.RERUN_OF_FIELD: batch_id}
    plan = plan_content(name, selection.input_file(), first.endpoint, first.completion_window, metadata, key)
    again = f"Run the same command again to re-attach: {this_command()}"
    batch, reattached = start_batch(conn, plan)
    announce(plan, batch, reattached)
    batch = follow(conn, batch, again)
    output_lines, error_lines = reruns.combine(selection.again, first_results, download_results(conn, batch))
    outcome = write_results(batch, selection.custom_ids, output_lines, error_lines, output, errors_mode)
    if batch.status == "failed":  # nothing of it ran: the output holds the first batch's results only
        note(f"Wrote {outcome.lines} lines to {output}, the results of batch {batch_id} alone.")
        raise api.CliError(f"batch {batch.id} failed: {batch_errors(batch)}")
    return report(batch, outcome, as_json, {"rerun_of": batch_id, "reran": len(selection.again)})


def download_input(conn: api.Connection, batch: Batch) -> bytes:
    """A batch's input file, checked; a readable error, with what to do, if the server no longer has it."""
    try:
        with api.readable_errors(conn.base_url):
            content = api.download(conn.client, batch.input_file_id)
    except api.CliError as error:
        raise api.CliError(f"{error}; pass the batch's input file with --input INPUT.jsonl") from None
    return checked_input(content, f"the input file {batch.input_file_id} of batch {batch.id}")


def checked_input(content: bytes, name: str) -> bytes:
    problems = jsonl.check_input(content)
    if problems:
        raise api.CliError(f"{name}: {'; '.join(problems)}")
    return content


@batch_command(short_help="Cancel a batch.")
def cancel(conn: api.Connection, batch_id: str, as_json: bool) -> int:
    """Cancel a batch (requests not yet sent are dropped; results so far are kept)."""
    with api.readable_errors(conn.base_url):
        batch = api.cancel(conn.client, batch_id)
    emit_batch(batch, as_json, echo_status_line)
    return EXIT_OK


@cli.command(name="list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many, newest first.")
@json_option
@with_connection
@reported
def list_command(conn: api.Connection, limit: int, as_json: bool) -> int:
    """List recent batches."""
    with api.readable_errors(conn.base_url):
        batches = api.list_batches(conn.client, limit)
    if as_json:
        emit_json([batch_json(batch) for batch in batches])
        return EXIT_OK
    print_batches(batches)
    return EXIT_OK


def main() -> None:
    """The console script.

    Not in click's standalone mode: that turns a Ctrl-C which comes before a command's own handling
    (while parsing arguments, say) into "Aborted!" and status 1, where this tool promises 130.
    """
    try:
        code = cli.main(prog_name="llama-batches", standalone_mode=False)
    except click.ClickException as error:  # a usage error: click's message and status (2)
        error.show()
        code = error.exit_code
    except (click.Abort, KeyboardInterrupt):  # nothing was started
        note("interrupted")
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else EXIT_OK)  # commands exit themselves; --help returns 0
