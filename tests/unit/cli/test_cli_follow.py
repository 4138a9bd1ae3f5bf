"""The `llama-batches` command line while it follows a batch and writes its output: server outages ridden
out (llama_batches/client.py `follow`), Ctrl-C, periodic progress lines without a terminal, and a reader
that quits early (`| head`). Fake clients for the logic; a fake Batch API server for the real commands."""

import io
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import Batch

from llama_batches import cli
from llama_batches import client as api
from llama_batches.console import Console
from llama_batches.progress import BatchProgress
from llama_batches.session import follow
from tests.processes import LLAMA_BATCHES, cli_env, interrupt_when
from tests.unit.cli.conftest import FakeBatchAPI, batch_body

URL = "http://127.0.0.1:9/v1"


def a_batch(status: str, done: int = 3, total: int = 3) -> Batch:
    return Batch.model_validate(batch_body("batch_1", status, done, total=total))


def unreachable() -> openai.APIConnectionError:
    return openai.APIConnectionError(request=httpx.Request("GET", f"{URL}/batches/batch_1"))


def answered(status: int) -> openai.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("GET", f"{URL}/batches/batch_1"))
    return openai.APIStatusError(f"Error code: {status}", response=response, body=None)


class FakeTime:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeBatches:
    """`client.batches` whose `retrieve` answers from a script: a state, or an error to raise."""

    def __init__(self, script: list[Batch | BaseException], fake_time: FakeTime, seconds_per_call: float = 0.0):
        self.script = script
        self.time = fake_time
        self.seconds_per_call = seconds_per_call
        self.calls = 0

    def retrieve(self, batch_id: str, **options: Any) -> Batch:
        self.calls += 1
        self.time.now += self.seconds_per_call
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeClient:
    def __init__(self, batches: FakeBatches) -> None:
        self.batches = batches


def follow_with(script: list[Batch | BaseException], **options: Any) -> tuple[Any, list[Any], FakeTime, FakeBatches]:
    """Run `api.follow` over a script; (its result or the error it raised, outage notices, time, batches)."""
    fake_time = FakeTime()
    batches = FakeBatches(script, fake_time, options.pop("seconds_per_call", 0.0))
    notices: list[Any] = []
    try:
        result: Any = api.follow(
            FakeClient(batches),  # type: ignore[arg-type]
            "batch_1",
            lambda batch: None,
            notices.append,
            sleep=fake_time.sleep,
            clock=fake_time.clock,
            **options,
        )
    except openai.OpenAIError as error:
        result = error
    return result, notices, fake_time, batches


# Outages while following.


def test_an_outage_is_ridden_out_and_told_once_then_when_it_ends() -> None:
    down = unreachable()
    script = [a_batch("in_progress", 1), down, down, answered(503), answered(502), a_batch("completed")]
    result, notices, fake_time, batches = follow_with(script, first_interval=0.25)

    assert isinstance(result, Batch) and result.status == "completed"
    assert notices == [down, None]
    assert batches.calls == 6
    assert fake_time.sleeps == [0.25, 1.0, 2.0, 4.0, 8.0]  # the poll interval, then the backoff doubling


def test_each_outage_is_told_and_the_backoff_starts_over() -> None:
    down = unreachable()
    script = [a_batch("in_progress", 1), down, down, a_batch("in_progress", 2), down, a_batch("completed")]
    result, notices, fake_time, _ = follow_with(script, first_interval=0.25)

    assert result.status == "completed"
    assert notices == [down, None, down, None]
    assert fake_time.sleeps == [0.25, 1.0, 2.0, 0.375, 1.0]


@pytest.mark.parametrize("error", [unreachable(), answered(500), answered(503), answered(429)], ids=repr)
def test_a_lasting_outage_ends_the_follow_at_the_limit_not_before_nor_much_after(error: openai.OpenAIError) -> None:
    result, notices, fake_time, batches = follow_with([a_batch("in_progress", 1), error], outage_limit=300)

    assert result is error
    assert notices == [error]  # said once, not once per try
    assert 300 <= fake_time.now <= 300 + api.POLL_MAX_SECONDS
    assert max(fake_time.sleeps) == api.OUTAGE_MAX_DELAY
    assert batches.calls < 20  # backoff: a handful of tries, not a busy loop


def test_slow_failing_polls_count_toward_the_limit() -> None:
    """A server that takes the whole timeout to fail each poll: the limit is wall time, not a number of tries."""
    result, _, fake_time, batches = follow_with([a_batch("in_progress", 1), unreachable()], seconds_per_call=100)

    assert isinstance(result, openai.APIConnectionError)
    assert fake_time.now <= api.OUTAGE_LIMIT_SECONDS + 2 * 100
    assert batches.calls <= 5


@pytest.mark.parametrize("status", [400, 401, 404])
def test_a_refusal_is_not_an_outage(status: int) -> None:
    error = answered(status)
    result, notices, fake_time, batches = follow_with([a_batch("in_progress", 1), error])

    assert result is error
    assert notices == [] and batches.calls == 2 and fake_time.sleeps == [api.POLL_FIRST_SECONDS]


def test_giving_up_is_one_error_line_with_how_to_follow_again(capsys: pytest.CaptureFixture[str]) -> None:
    fake_time = FakeTime()
    conn = api.Connection(URL, "none", FakeClient(FakeBatches([unreachable()], fake_time)))  # type: ignore[arg-type]
    again = "Run the same command again to re-attach: llama-batches run in.jsonl -o out.jsonl"

    with pytest.raises(api.CliError) as raised:
        follow(conn, a_batch("in_progress", 1), again, sleep=fake_time.sleep, clock=fake_time.clock)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach {URL}: is the server running? Gave up after 5m00s;")
    assert "batch batch_1 keeps running on the server" in message and message.endswith(again)
    stderr = capsys.readouterr().err
    assert stderr.count("cannot reach") == 1 and "Trying again for up to 5m00s" in stderr


def test_a_refusal_while_following_is_the_plain_error() -> None:
    fake_time = FakeTime()
    conn = api.Connection(URL, "none", FakeClient(FakeBatches([answered(404)], fake_time)))  # type: ignore[arg-type]

    with pytest.raises(api.CliError) as raised:
        follow(conn, a_batch("in_progress", 1), "again", sleep=fake_time.sleep, clock=fake_time.clock)

    assert str(raised.value) == "the server answered 404: Error code: 404"


# Progress lines without a terminal.


def test_without_a_terminal_the_counts_are_printed_every_half_minute_and_on_each_status_change() -> None:
    fake_time = FakeTime()
    out = io.StringIO()
    progress = BatchProgress(Console(file=out, width=200), clock=fake_time.clock)
    assert progress.progress is None  # not a terminal: lines, not a bar

    with progress:
        for seconds, status, done in [
            (0, "validating", 0),
            (5, "in_progress", 0),
            (20, "in_progress", 20),  # 15 s after the last line: nothing
            (36, "in_progress", 36),  # 31 s: the counts, and the pace
            (50, "in_progress", 50),
            (67, "in_progress", 67),
            (70, "finalizing", 100),
        ]:
            fake_time.now = seconds
            progress.update(a_batch(status, done, total=100))

    assert out.getvalue().splitlines() == [
        "batch_1: validating (0/100 done, 0 failed)",
        "batch_1: in_progress (0/100 done, 0 failed)",
        "batch_1: in_progress (36/100 done, 0 failed) 1.0 req/s ETA 1m04s",
        "batch_1: in_progress (67/100 done, 0 failed) 1.0 req/s ETA 33s",
        "batch_1: finalizing (100/100 done, 0 failed) 1.4 req/s",
    ]


# Ctrl-C: exit status 130 wherever it comes.


def test_ctrl_c_before_a_command_runs_is_status_130_not_clicks_aborted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "Connection", interrupted)  # made by the option wrapper, before the command's handling
    monkeypatch.setattr(sys, "argv", ["llama-batches", "list"])

    with pytest.raises(SystemExit) as exited:
        cli.main()

    assert exited.value.code == 130
    stderr = capsys.readouterr().err
    assert "interrupted" in stderr and "Aborted" not in stderr


def test_ctrl_c_while_following_is_status_130_with_how_to_follow_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_client = FakeClient(FakeBatches([a_batch("in_progress", 1), KeyboardInterrupt()], FakeTime()))
    monkeypatch.setattr(api, "OpenAI", lambda **options: fake_client)
    monkeypatch.setattr(sys, "argv", ["llama-batches", "wait", "batch_1"])

    with pytest.raises(SystemExit) as exited:
        cli.main()

    assert exited.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted: batch batch_1 keeps running on the server (not cancelled). "
        "Follow it again with: llama-batches wait batch_1"
    )


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [(["run"], 2, "Missing argument 'INPUT.jsonl'"), (["--help"], 0, ""), (["nope"], 2, "No such command")],
)
def test_usage_errors_and_help_keep_their_status_out_of_standalone_mode(
    argv: list[str], code: int, said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["llama-batches", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code
    captured = capsys.readouterr()
    assert said in captured.err
    assert ("Usage: llama-batches" in captured.out) == (code == 0)


# The real commands, in a subprocess, against a fake Batch API server.


def start(server: FakeBatchAPI, *args: str, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> Any:
    return subprocess.Popen(
        [*LLAMA_BATCHES, *args],
        env=cli_env(server.url),
        stdout=stdout,
        stderr=stderr,
        text=True,
        # SIGINT at its default: a test session started in the background ignores it, and the child would too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_a_reader_that_quits_early_ends_the_command_quietly(server: FakeBatchAPI, as_json: bool) -> None:
    server.listed = [batch_body(f"batch_{n:04d}", "completed") for n in range(50)]
    process = start(server, "list", *(["--json"] if as_json else []))
    # The reader is gone before the command writes (as `| head -1` is once it has its line): every write
    # fails. A reader that goes in the middle of a write may not fail that one, so it is not the test.
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=60)

    assert (process.returncode, stderr) == (141, "")


def test_wait_rides_out_a_server_restart(server: FakeBatchAPI) -> None:
    server.answers = ["in_progress", 503, "completed"]
    process = start(server, "wait", "batch_1")
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    assert stdout == "batch_1: completed (3/3 done, 0 failed)\n"
    assert stderr.count("the server answered 503: the server is restarting. Trying again for up to 5m00s") == 1
    assert f"{server.url} answers again: following batch batch_1." in stderr


def test_ctrl_c_while_waiting_exits_130_with_how_to_follow_again(server: FakeBatchAPI, tmp_path: Path) -> None:
    server.answers = ["in_progress"]
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        process = start(server, "wait", "batch_1", stderr=stderr)
        # The progress line: it is following.
        interrupt_when(process, stderr_path, lambda said: "batch_1: in_progress" in said)
    said = stderr_path.read_text()

    assert process.returncode == 130, said
    assert said.splitlines()[-1] == (
        "interrupted: batch batch_1 keeps running on the server (not cancelled). "
        "Follow it again with: llama-batches wait batch_1"
    )
    assert "Aborted" not in said and "Traceback" not in said
