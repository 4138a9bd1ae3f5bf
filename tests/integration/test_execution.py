"""Running batches through a real stack: every endpoint, every validation code, expiry."""

import json
import uuid

import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, upload_jsonl, wait_for_batch
from tools.harness import ServerProcess, StandInControl


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/v1/chat/completions", {"model": "local/m-chat", "messages": [{"role": "user", "content": "hello"}]}),
        ("/v1/completions", {"model": "local/m-chat", "prompt": "once upon a time"}),
        ("/v1/embeddings", {"model": "local/m-embed", "input": ["first text", "second text"]}),
    ],
)
def test_every_endpoint_runs(openai_client: OpenAI, endpoint: str, body: dict) -> None:
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body} for i in range(3)]
    file_id = upload_jsonl(openai_client, lines)
    created = openai_client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    batch = wait_for_batch(openai_client, created.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.completed == 3
    assert batch.model == body["model"]
    assert batch.usage.input_tokens > 0
    results = read_result_file(openai_client, batch.output_file_id)
    assert [line["custom_id"] for line in results] == ["c0", "c1", "c2"]
    response_body = results[0]["response"]["body"]
    expected_object = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion"}
    assert response_body["object"] == expected_object.get(endpoint, "list")
    if endpoint == "/v1/chat/completions":  # null fields stay, as OpenAI writes them
        choice = response_body["choices"][0]
        assert choice["logprobs"] is None
        assert {"refusal", "tool_calls"} <= set(choice["message"])
    if endpoint == "/v1/embeddings":
        assert len(response_body["data"]) == 2
        assert len(response_body["data"][0]["embedding"]) == 8


def line_with(**change: object) -> bytes:
    line = {**chat_lines(1, tag="second")[0], "custom_id": "second"}
    for path, value in change.items():
        target = line
        *parents, leaf = path.split("__")
        for parent in parents:
            target = target[parent]
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value
    return json.dumps(line).encode()


GOOD = json.dumps(chat_lines(1, tag="good")[0]).encode()


@pytest.mark.parametrize(
    ("second_line", "code", "param"),
    [
        (b"{this is not json", "invalid_json_line", None),
        (b'["a", "list"]', "invalid_json_line", None),
        (line_with(custom_id=None), "missing_required_parameter", "custom_id"),
        (line_with(body=None), "missing_required_parameter", "body"),
        (line_with(method="GET"), "invalid_request", "method"),
        (line_with(body__model=None), "invalid_request", "body.model"),
        (line_with(body__messages="hi"), "invalid_request", "body.messages"),
        (line_with(url="/v1/embeddings"), "invalid_url", "url"),
        (line_with(body__stream=True), "streaming_unsupported", "body.stream"),
        (line_with(body__model="local/missing"), "model_not_found", "body.model"),
        (GOOD.replace(b"good question 0", b"other"), "duplicate_custom_id", "custom_id"),
    ],
)
def test_every_validation_code(openai_client: OpenAI, second_line: bytes, code: str, param: str | None) -> None:
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, GOOD + b"\n" + second_line).id)
    assert batch.status == "failed"
    assert batch.failed_at is not None
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == (code, 2, param)
    assert error.message
    openai_wording = {  # what OpenAI's service says, as llama-stack's own batches suite quotes it
        b"{this is not json": "This line is not parseable as valid JSON.",
        line_with(body__model="local/missing"): "The provided model 'local/missing' is not supported by the Batch API.",
    }
    if second_line in openai_wording:
        assert error.message.startswith(openai_wording[second_line])


def test_an_empty_file_fails(openai_client: OpenAI) -> None:
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, b"\n\n").id)
    assert batch.status == "failed"
    assert "empty" in batch.errors.data[0].message


def test_more_than_50000_requests_fail(openai_client: OpenAI) -> None:
    body = b'"method": "POST", "url": "/v1/chat/completions", "body": {"model": "local/m-chat", "messages": []}}'
    content = b"\n".join(b'{"custom_id": "r%d", ' % n + body for n in range(50_001))
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, content).id, timeout=120)
    assert batch.status == "failed"
    assert "more than 50000 requests" in batch.errors.data[0].message


def test_many_invalid_lines_are_capped_with_a_count(openai_client: OpenAI) -> None:
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, b"bad\n" * 250).id)
    assert batch.status == "failed"
    assert len(batch.errors.data) == 101
    assert "150 more" in batch.errors.data[-1].message


def test_expiry_returns_finished_work_and_marks_the_rest(
    short_window_stack: ServerProcess, standin: StandInControl
) -> None:
    client = OpenAI(base_url=f"{short_window_stack.url}/v1", api_key="none", max_retries=0)
    tag = uuid.uuid4().hex[:8]
    lines = chat_lines(3, tag=tag) + chat_lines(50, tag=tag, suffix=" [[sleep:1]]")
    for number, line in enumerate(lines):
        line["custom_id"] = f"req-{number}"
    created = create_chat_batch(client, lines)
    batch = wait_for_batch(client, created.id, timeout=30)
    assert batch.status == "expired"
    assert batch.expired_at is not None and batch.expired_at >= batch.created_at + 3
    output = read_result_file(client, batch.output_file_id)
    errors = read_result_file(client, batch.error_file_id)
    assert {line["custom_id"] for line in output} >= {"req-0", "req-1", "req-2"}
    assert len(output) + len(errors) == 53
    assert {line["custom_id"] for line in output} | {line["custom_id"] for line in errors} == {
        f"req-{n}" for n in range(53)
    }
    expired = [line for line in errors if line["error"] and line["error"]["code"] == "batch_expired"]
    assert len(expired) >= 53 - 3 - 10 * 4  # at most the window ran in 3 s of 1 s requests
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))


def test_batch_completions_are_stored_only_when_asked(openai_client: OpenAI) -> None:
    tag = uuid.uuid4().hex[:8]
    lines = chat_lines(2, tag=tag)
    lines[1]["body"]["store"] = True
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, lines).id)
    assert batch.status == "completed"
    ids = {
        line["custom_id"]: line["response"]["body"]["id"]
        for line in read_result_file(openai_client, batch.output_file_id)
    }
    stored = {completion.id for completion in openai_client.chat.completions.list(limit=100)}
    assert ids["req-1"] in stored
    assert ids["req-0"] not in stored
