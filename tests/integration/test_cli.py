"""The `llama-batches` command line against a real stack: run as a user runs it, in a subprocess, and
judged by its exit status, its output file and what it says on stderr."""

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, upload_jsonl
from tests.processes import LLAMA_BATCHES, cli_env, interrupt_when, llama_batches
from tools.harness import ServerProcess, StandInControl, free_port


def write_input(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_text().splitlines() if raw.strip()]


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2 and exactly one readable line on stderr, holding every fragment; that line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def base_url(stack: ServerProcess) -> str:
    return f"{stack.url}/v1"


def batches_with_key(client: OpenAI, key: str) -> list[str]:
    return [
        batch.id for batch in client.batches.list(limit=100) if (batch.metadata or {}).get("llama_batches_key") == key
    ]


def test_run_writes_one_line_per_request_in_input_order(base_url: str, tmp_path: Path, run_dir: Path) -> None:
    lines = chat_lines(8)
    source = write_input(tmp_path / "questions.jsonl", lines)
    output = tmp_path / "answers.jsonl"

    started = time.monotonic()
    result = llama_batches(base_url, "run", source, "-o", output)
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Idempotency key llama-batches-" in result.stderr
    assert "running this same command again re-attaches to this batch" in result.stderr
    assert "8 succeeded, 0 failed" in result.stdout
    answers = read_jsonl(output)
    assert [answer["custom_id"] for answer in answers] == [line["custom_id"] for line in lines]
    for line, answer in zip(lines, answers, strict=True):
        assert answer["response"]["status_code"] == 200
        reply = answer["response"]["body"]["choices"][0]["message"]["content"]
        assert line["body"]["messages"][0]["content"] in reply  # the stand-in echoes the prompt
    # A transcript for the README: what a user sees (stderr is not a terminal here, so status lines, not a bar).
    transcript = f"$ llama-batches run {source.name} -o {output.name}\n{result.stderr}{result.stdout}"
    transcript += f"$ echo $?\n{result.returncode}\n"
    (run_dir / "cli-transcript.txt").write_text(transcript)
    print(f"\n{transcript}(took {elapsed:.1f} s)")


def test_a_failed_request_exits_1_and_keeps_its_place(base_url: str, tmp_path: Path) -> None:
    lines = chat_lines(5)
    lines[2]["body"]["messages"][0]["content"] += " [[status:400]]"  # the stand-in answers this one with HTTP 400
    source = write_input(tmp_path / "some-fail.jsonl", lines)
    output = tmp_path / "out.jsonl"

    result = llama_batches(base_url, "run", source, "-o", output, "--json")

    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["succeeded"], summary["failed"], summary["missing"]) == (4, 1, 0)
    answers = read_jsonl(output)
    assert [answer["custom_id"] for answer in answers] == [line["custom_id"] for line in lines]
    failed = answers[2]
    assert failed["error"] is not None or failed["response"]["status_code"] == 400
    assert all(answer["response"]["status_code"] == 200 for i, answer in enumerate(answers) if i != 2)

    # The same file again (the error mode is not part of the batch): the finished batch, split in two files.
    split = tmp_path / "split.jsonl"
    again = llama_batches(base_url, "run", source, "-o", split, "--errors", "separate", "--json")
    assert again.returncode == 1, again.stderr
    assert json.loads(again.stdout)["batch"]["id"] == summary["batch"]["id"]
    assert "Re-attached to batch" in again.stderr
    assert [answer["custom_id"] for answer in read_jsonl(split)] == ["req-0", "req-1", "req-3", "req-4"]
    assert [answer["custom_id"] for answer in read_jsonl(tmp_path / "split.errors.jsonl")] == ["req-2"]


def following(stderr: str) -> bool:
    """Whether `run` has printed the progress line of the batch it created: it is following it."""
    if "created batch " not in stderr:
        return False
    batch_id = stderr.split("created batch ")[1].split(".")[0]
    return any(line.startswith(f"{batch_id}: ") for line in stderr.splitlines())


def test_interrupted_run_leaves_the_batch_running_and_the_same_command_reattaches(
    base_url: str, tmp_path: Path, standin: StandInControl, openai_client: OpenAI
) -> None:
    standin.configure(latency_mean=0.2)  # 10 requests in flight per batch: 250 requests take about 5 s
    lines = chat_lines(250)
    source = write_input(tmp_path / "long.jsonl", lines)
    output = tmp_path / "long-out.jsonl"
    stderr_path = tmp_path / "first.stderr"
    command = [*LLAMA_BATCHES, "run", str(source), "-o", str(output), "--json"]

    with stderr_path.open("w") as stderr:
        # SIGINT at its default in the child: a test session started in the background (`make test &` from a
        # script) ignores it, the child would inherit that, and Python would then never raise KeyboardInterrupt.
        process = subprocess.Popen(
            command,
            env=cli_env(base_url),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        # The first progress line ("batch_...: validating"): the batch exists and the command follows it.
        interrupt_when(process, stderr_path, following)
    first = stderr_path.read_text()

    assert process.returncode == 130, first
    assert "Traceback" not in first
    assert "keeps running on the server (not cancelled)" in first
    assert f"Run the same command again to re-attach: llama-batches run {source} -o {output} --json" in first
    batch_id = first.split("created batch ")[1].split(".")[0]
    assert openai_client.batches.retrieve(batch_id).status in {"validating", "in_progress", "finalizing"}
    assert not output.exists()

    result = llama_batches(base_url, "run", source, "-o", output, "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["reattached"] is True
    assert summary["batch"]["id"] == batch_id
    assert f"Re-attached to batch {batch_id}" in result.stderr
    assert "nothing uploaded" in result.stderr
    assert [answer["custom_id"] for answer in read_jsonl(output)] == [line["custom_id"] for line in lines]
    assert batches_with_key(openai_client, summary["idempotency_key"]) == [batch_id]


def test_a_batch_the_server_fails_exits_2_with_its_reason(base_url: str, tmp_path: Path) -> None:
    line = chat_lines(1)[0]
    del line["body"]["model"]  # well-formed for the local check; the server's validation refuses it
    source = write_input(tmp_path / "no-model.jsonl", [line])
    output = tmp_path / "out.jsonl"

    result = llama_batches(base_url, "run", source, "-o", output)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: batch batch_") and "failed: line 1:" in last and "body.model" in last
    assert not output.exists()


def test_a_cancelled_batch_exits_2_with_missing_results_in_place(
    base_url: str, tmp_path: Path, standin: StandInControl
) -> None:
    standin.configure(latency_mean=0.2)
    lines = chat_lines(300)  # about 6 s of work: the cancel comes long before the end
    source = write_input(tmp_path / "to-cancel.jsonl", lines)
    batch_id = llama_batches(base_url, "submit", source).stdout.strip()

    cancelled = llama_batches(base_url, "cancel", batch_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"{batch_id}: cancel")
    # The same file again: the cancelled batch (a new one would need a new --key), whatever it finished.
    output = tmp_path / "out.jsonl"
    result = llama_batches(base_url, "run", source, "-o", output, "--json")

    assert result.returncode == 2, result.stderr
    assert "pass --key with a new key" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["batch"]["id"] == batch_id and summary["batch"]["status"] == "cancelled"
    assert summary["missing"] > 0
    answers = read_jsonl(output)
    assert [answer["custom_id"] for answer in answers] == [line["custom_id"] for line in lines]
    missing = [answer for answer in answers if (answer["error"] or {}).get("code") == "missing_result"]
    assert len(missing) == summary["missing"]


def uploaded_names(client: OpenAI) -> set[str]:
    return {file.filename for file in client.files.list(purpose="batch")}


def test_missing_input_file(base_url: str, tmp_path: Path) -> None:
    result = llama_batches(base_url, "run", tmp_path / "nowhere.jsonl", "-o", tmp_path / "out.jsonl")
    assert_one_error_line(result, "nowhere.jsonl: no such file")


def test_an_invalid_line_is_named_and_nothing_is_uploaded(base_url: str, tmp_path: Path, openai_client: OpenAI) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}.jsonl"
    source = tmp_path / name
    good = [json.dumps(line) for line in chat_lines(3)]
    source.write_text("\n".join([good[0], good[1], '{"custom_id": "x" "method": "POST"}', good[2]]) + "\n")

    result = llama_batches(base_url, "run", source, "-o", tmp_path / "out.jsonl")

    assert_one_error_line(
        result, "line 3: not valid JSON (Expecting ',' delimiter at column 19)", "nothing was uploaded"
    )
    assert name not in uploaded_names(openai_client)


def test_a_server_that_is_down(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", chat_lines(2))
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    result = llama_batches(down, "run", source, "-o", tmp_path / "out.jsonl")
    assert_one_error_line(result, f"cannot reach {down}: is the server running?")


def test_a_key_used_for_another_file(base_url: str, tmp_path: Path) -> None:
    key = f"nightly-{uuid.uuid4().hex[:8]}"
    first = write_input(tmp_path / "first.jsonl", chat_lines(2))
    second = write_input(tmp_path / "second.jsonl", chat_lines(2))
    assert llama_batches(base_url, "submit", first, "--key", key).returncode == 0

    result = llama_batches(base_url, "run", second, "-o", tmp_path / "out.jsonl", "--key", key)

    assert_one_error_line(result, f"idempotency key '{key}' was already used with other parameters", "--key")


def test_a_key_the_server_refuses_with_409(base_url: str, tmp_path: Path, openai_client: OpenAI) -> None:
    """A key used outside this tool (no trace in the metadata): the server's 409 becomes the same advice."""
    key = f"outside-{uuid.uuid4().hex[:8]}"
    file_id = upload_jsonl(openai_client, chat_lines(1))
    openai_client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"idempotency_key": key},
    )
    source = write_input(tmp_path / "mine.jsonl", chat_lines(2))

    result = llama_batches(base_url, "submit", source, "--key", key)

    assert_one_error_line(result, f"idempotency key '{key}' was already used with other parameters", "--key KEY")


def test_scripting_commands_print_json(base_url: str, tmp_path: Path, openai_client: OpenAI) -> None:
    lines = chat_lines(4)
    source = write_input(tmp_path / "script.jsonl", lines)

    submitted = llama_batches(base_url, "submit", source, "--json")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = json.loads(submitted.stdout)["id"]
    # Plain `submit` prints the id alone, for `id=$(llama-batches submit ...)`: the same batch.
    assert llama_batches(base_url, "submit", source).stdout.strip() == batch_id

    status = llama_batches(base_url, "status", batch_id, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == batch_id

    waited = llama_batches(base_url, "wait", batch_id, "--json")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["status"] == "completed"

    output = tmp_path / "script-out.jsonl"
    results = llama_batches(base_url, "results", batch_id, "-o", output, "--input", source, "--json")
    assert results.returncode == 0, results.stderr
    assert json.loads(results.stdout)["succeeded"] == 4
    assert [answer["custom_id"] for answer in read_jsonl(output)] == [line["custom_id"] for line in lines]

    listed = llama_batches(base_url, "list", "--limit", "5", "--json")
    assert listed.returncode == 0, listed.stderr
    assert batch_id in [batch["id"] for batch in json.loads(listed.stdout)]

    table = llama_batches(base_url, "status", batch_id)
    assert table.returncode == 0 and batch_id in table.stdout and "completed" in table.stdout

    # Cancelling a completed batch is the server's 409, told in one line.
    assert_one_error_line(llama_batches(base_url, "cancel", batch_id, "--json"), "409")
