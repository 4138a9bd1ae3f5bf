"""A new user's first hour: `make run` (tools/serve.py) on busy ports and stopped cleanly, a wrong
MODEL_URL, a model named without its provider prefix, and what the server log says meanwhile."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, wait_for_batch
from tests.processes import llama_batches
from tools.harness import REPO, ServerProcess, free_port, start_stack

SERVE = REPO / "tools" / "serve.py"


def start_serve(
    tmp_path: Path, port: int, standin_port: int, name: str, model_url: str | None = None
) -> subprocess.Popen[str]:
    """tools/serve.py in a process of its own, its output in <name>.log; with the stand-in unless `model_url`."""
    env = {
        **os.environ,
        "PORT": str(port),
        "STANDIN_PORT": str(standin_port),
        "STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("MODEL_URL", None)
    if model_url is not None:
        env["MODEL_URL"] = model_url
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, str(SERVE)], env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )


def wait_healthy(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"nothing healthy on port {port}")


def test_make_run_refuses_busy_ports_and_stops_cleanly(tmp_path: Path) -> None:
    port, standin_port = free_port(), free_port()
    first = start_serve(tmp_path, port, standin_port, "first")
    try:
        wait_healthy(port)
        deadline = time.monotonic() + 30  # serve.py says so once it has seen the stack answer too
        while "Serving on" not in (tmp_path / "first.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = start_serve(tmp_path, port, standin_port, "second")
        assert second.wait(60) == 1
        said = (tmp_path / "second.log").read_text()
        assert f"Port {port} on 127.0.0.1, for the stack, is already in use" in said
        assert "Traceback" not in said and "STAND-IN" not in said  # no banner claiming it runs
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
    said = (tmp_path / "first.log").read_text()
    assert "Traceback" not in said
    assert f"Serving on http://127.0.0.1:{port}" in said
    with pytest.raises(httpx.ConnectError):  # both servers are gone
        httpx.get(f"http://127.0.0.1:{standin_port}/health", timeout=2)


def test_make_run_says_when_model_url_does_not_answer_and_serves_anyway(tmp_path: Path) -> None:
    port, closed = free_port(), f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    serve = start_serve(tmp_path, port, free_port(), "closed", model_url=closed)
    log = tmp_path / "closed.log"
    try:
        wait_healthy(port)
        deadline = time.monotonic() + 30
        while "MODEL_URL" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    said = log.read_text().splitlines()
    banner = next(n for n, line in enumerate(said) if line.startswith(f"*** Serving on http://127.0.0.1:{port}"))
    [warning] = [line for line in said if line.startswith("*** MODEL_URL")]
    assert said.index(warning) > banner  # told with the banner, once the stack serves
    assert warning == (
        f"*** MODEL_URL {closed} does not answer ([Errno 111] Connection refused); "
        "the stack lists a backend's models when it starts: fix that, then restart this server."
    )
    assert "Traceback" not in "\n".join(said)


@pytest.fixture(scope="module")
def stack_with_a_wrong_model_url(run_dir: Path) -> Iterator[ServerProcess]:
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    env = {"BATCHES_MAX_ATTEMPTS": "2", "BATCHES_BACKOFF_INITIAL_SECONDS": "0.05", "BATCHES_BACKOFF_MAX_SECONDS": "0.1"}
    server = start_stack(run_dir, run_dir / "wrong-url-state", closed, env)  # no warm-up: nothing answers
    server.closed_url = closed  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_a_wrong_model_url_is_named_in_error_lines_and_logged(stack_with_a_wrong_model_url: ServerProcess) -> None:
    stack = stack_with_a_wrong_model_url
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    batch = wait_for_batch(client, create_chat_batch(client, chat_lines(2)).id)
    assert (batch.status, batch.request_counts.failed) == ("completed", 2)
    lines = read_result_file(client, batch.error_file_id)
    assert all(line["error"]["code"] == "connection_error" for line in lines)
    assert all(stack.closed_url.removesuffix("/v1") in line["error"]["message"] for line in lines)  # type: ignore[attr-defined]
    assert stack.log_records("Retrying batch requests")
    assert "failed=2" in stack.wait_for_record("Batch finished", batch.id)


def test_a_model_of_a_backend_that_does_not_answer_fails_validation_naming_the_backend(
    stack_with_a_wrong_model_url: ServerProcess,
) -> None:
    # The stack could not list the backend's models when it started: it knows only run.yaml's own.
    stack = stack_with_a_wrong_model_url
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    batch = wait_for_batch(client, create_chat_batch(client, chat_lines(2, model="local/llama3.2:3b")).id)
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == ("model_not_found", 1, "body.model")
    closed_url = stack.closed_url  # type: ignore[attr-defined]
    assert f"the model backend at {closed_url} did not answer (Connection error.)" in error.message
    assert error.message.startswith("The provided model 'local/llama3.2:3b' is not supported by the Batch API.")


def test_the_cli_says_why_requests_failed_and_why_a_batch_failed_validation(
    stack_with_a_wrong_model_url: ServerProcess, tmp_path: Path
) -> None:
    stack = stack_with_a_wrong_model_url
    closed_url = stack.closed_url  # type: ignore[attr-defined]
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in chat_lines(5)))

    failing = llama_batches(f"{stack.url}/v1", "run", source, "-o", tmp_path / "answers.jsonl", timeout=120)

    assert failing.returncode == 1, failing.stderr
    assert ": 0 succeeded, 5 failed." in failing.stdout
    [why] = [line for line in failing.stderr.splitlines() if line.startswith("First failure: ")]
    assert why.startswith("First failure: req-0: connection_error: ")
    assert f"Cannot reach the model backend at {closed_url}/chat/completions." in why

    source.write_text("".join(json.dumps(line) + "\n" for line in chat_lines(5, model="local/llama3.2:3b")))

    refused = llama_batches(f"{stack.url}/v1", "run", source, "-o", tmp_path / "answers.jsonl", timeout=120)

    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.splitlines()[-1]
    assert last.startswith("error: batch batch_") and " failed: line 1: model_not_found: The provided model" in last
    assert f"the model backend at {closed_url} did not answer" in last


def test_a_misspelt_model_gets_a_did_you_mean(stack: ServerProcess) -> None:
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    batch = wait_for_batch(client, create_chat_batch(client, chat_lines(1, model="local/m-chta")).id)
    assert batch.status == "failed"
    assert [(e.code, e.message) for e in batch.errors.data] == [
        (
            "model_not_found",
            "The provided model 'local/m-chta' is not supported by the Batch API. Did you mean 'local/m-chat'?",
        )
    ]


def test_a_model_without_its_prefix_gets_a_hint_and_refusals_log_one_line(stack: ServerProcess) -> None:
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    batch = wait_for_batch(client, create_chat_batch(client, chat_lines(1, model="m-chat")).id)
    assert batch.status == "failed"
    message = batch.errors.data[0].message
    assert "'<provider_id>/<model>'" in message and "Did you mean 'local/m-chat'?" in message
    assert httpx.get(f"{stack.url}/v1/batches/batch_{'0' * 32}", timeout=10).status_code == 404
    deadline = time.monotonic() + 10
    while "Refused a batches request" not in stack.log_tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = stack.log_tail(200)
    assert "Refused a batches request" in log and "Batch failed validation" in log
    assert "BatchNotFoundError" not in log  # no traceback for a client's 404
