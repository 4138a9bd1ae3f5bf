"""What `llama-batches` says about a finished batch (llama_batches/output.py): why requests failed (the first
failure's custom_id, code and message) and why a batch failed validation (its first error), in one line
each on stderr. The real commands, in a subprocess, against a fake Batch API serving one batch and its files."""

import json
from pathlib import Path
from typing import Any

from openai.types import Batch

from llama_batches.output import batch_errors
from tests.processes import llama_batches
from tests.unit.cli.conftest import FakeBatchAPI, batch_body

CONNECTION_ERROR = {"code": "connection_error", "message": "Connection error. Cannot reach the model backend at x."}


def failure_line(custom_id: str) -> str:
    return json.dumps({"id": f"r-{custom_id}", "custom_id": custom_id, "response": None, "error": CONNECTION_ERROR})


def test_results_of_failed_requests_say_the_first_failures_code_and_message(
    server: FakeBatchAPI, tmp_path: Path
) -> None:
    server.answers = [batch_body("batch_1", "completed", 0, 5, error_file_id="file-err")]
    server.files["file-err"] = "\n".join(failure_line(f"req-{i}") for i in range(5)) + "\n"

    result = llama_batches(server.url, "results", "batch_1", "-o", tmp_path / "out.jsonl")

    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("Batch batch_1 completed: 0 succeeded, 5 failed.")
    assert result.stderr.splitlines() == [
        "First failure: req-0: connection_error: Connection error. Cannot reach the model backend at x."
    ]


def test_wait_for_a_batch_with_failed_requests_says_the_first_failure(server: FakeBatchAPI) -> None:
    server.answers = [batch_body("batch_1", "completed", 3, 2, output_file_id="file-out", error_file_id="file-err")]
    server.files["file-err"] = f"{failure_line('req-3')}\n{failure_line('req-4')}\n"

    result = llama_batches(server.url, "wait", "batch_1")

    assert result.returncode == 1, result.stderr
    assert result.stdout == "batch_1: completed (5/5 done, 2 failed)\n"
    assert result.stderr.splitlines()[-1] == (
        "First failure: req-3: connection_error: Connection error. Cannot reach the model backend at x."
    )


def test_wait_says_nothing_more_when_the_error_file_cannot_be_read(server: FakeBatchAPI) -> None:
    server.answers = [batch_body("batch_1", "completed", 3, 2, error_file_id="file-gone")]

    result = llama_batches(server.url, "wait", "batch_1")

    assert (result.returncode, result.stdout) == (1, "batch_1: completed (5/5 done, 2 failed)\n")
    assert "First failure" not in result.stderr and "Traceback" not in result.stderr


def test_a_batch_that_failed_validation_says_its_first_errors_code_and_message(server: FakeBatchAPI) -> None:
    errors = [
        {"code": "model_not_found", "line": 1, "param": "body.model", "message": "The provided model 'x' is unknown."},
        {"code": "model_not_found", "line": 4, "param": "body.model", "message": "The provided model 'y' is unknown."},
    ]
    server.answers = [batch_body("batch_1", "failed", 0, 0, errors={"object": "list", "data": errors})]

    result = llama_batches(server.url, "wait", "batch_1")

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: batch batch_1 failed: line 1: model_not_found: The provided model 'x' is unknown. (and 1 more error)"
    )


def test_a_failed_batchs_reason_is_one_line_whatever_its_errors() -> None:
    def failed(*errors: dict[str, Any]) -> Batch:
        return Batch.model_validate(
            batch_body("batch_1", "failed", 0, 0, errors={"object": "list", "data": list(errors)})
        )

    file_error = {"code": "invalid_request", "line": None, "message": "The input file is empty.\n"}
    assert batch_errors(failed(file_error)) == "invalid_request: The input file is empty."
    assert batch_errors(failed(*[file_error] * 3)) == "invalid_request: The input file is empty. (and 2 more errors)"
    assert batch_errors(failed({"line": 2})) == "line 2: no message"
    assert batch_errors(failed()) == "the server gave no reason"


def test_status_shows_the_servers_token_estimate_when_it_reports_one(server: FakeBatchAPI) -> None:
    server.answers = [batch_body("batch_1", "failed", 0, 0, estimated_input_tokens=12_345)]
    shown = llama_batches(server.url, "status", "batch_1")
    assert "input tokens (estimate)" in shown.stdout and "12,345" in shown.stdout

    server.answers = [batch_body("batch_1", "completed")]  # an OpenAI batch: no such line
    assert "estimate" not in llama_batches(server.url, "status", "batch_1").stdout
