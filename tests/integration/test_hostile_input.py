"""Hostile and accidental bad input through a real stack with the shipped configuration (one batch
at a time): every such batch ends in a terminal status, and an ordinary batch created after them all
still completes within seconds. Also: a provider-data header pins a batch to its server only when
it holds a credential, and pinned batches wait their turn."""

import json
import random
import time

import httpx
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, wait_for_batch
from tools.harness import ServerProcess, StandInControl


def valid_line(custom_id: str) -> bytes:
    return json.dumps(chat_lines(1, tag=custom_id)[0] | {"custom_id": custom_id}).encode()


def line_with(body_text: str, custom_id: str = "x") -> bytes:
    """A request line whose `messages` content is the raw JSON text `body_text`."""
    return (
        b'{"custom_id": "' + custom_id.encode() + b'", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"model": "local/m-chat", "messages": [{"role": "user", "content": ' + body_text.encode() + b"}]}}"
    )


def hostile_files() -> dict[str, tuple[bytes, str, str | None]]:
    """name -> (file content, expected status, expected code of the first error if it fails)."""
    noise = random.Random(11).randbytes(4096)
    unknown_models = b"\n".join(
        json.dumps(chat_lines(1)[0] | {"custom_id": f"m{i}", "body": {"model": f"nope/{i}", "messages": []}}).encode()
        for i in range(5_000)
    )
    return {
        "deep nesting": (b"[" * 1_500 + b"]" * 1_500 + b"\n" + valid_line("a"), "failed", "invalid_json_line"),
        "deep nesting inside a body": (line_with("[" * 1_500 + "]" * 1_500), "failed", "invalid_json_line"),
        "binary noise": (noise, "failed", "invalid_json_line"),
        "invalid UTF-8": (valid_line("a") + b'\n{"custom_id": "\xff\xfe"}', "failed", "invalid_json_line"),
        "lone surrogate escape": (line_with('"\\ud800"'), "failed", "invalid_json_line"),
        "NaN": (line_with("NaN"), "failed", "invalid_json_line"),
        "Infinity": (line_with("-Infinity"), "failed", "invalid_json_line"),
        "overflowing number": (line_with("1e999"), "failed", "invalid_json_line"),
        "huge integer": (line_with("1" * 5_000), "failed", "invalid_json_line"),
        "custom_id of 100 KB": (
            json.dumps(chat_lines(1)[0] | {"custom_id": "c" * 100_000}).encode(),
            "failed",
            "invalid_request",
        ),
        "whitespace only": (b" \n\t\n\r\n   ", "failed", "invalid_request"),
        "5,000 unknown models": (unknown_models, "failed", "model_not_found"),
        "BOM, CRLF and blank lines": (
            b"\xef\xbb\xbf" + valid_line("a") + b"\r\n\r\n   \r\n" + valid_line("b") + b"\r\n",
            "completed",
            None,
        ),
    }


def upload(client: OpenAI, content: bytes) -> str:
    return client.files.create(file=("input.jsonl", content), purpose="batch").id


def test_hostile_files_end_cleanly_and_do_not_hold_up_an_ordinary_batch(openai_client: OpenAI) -> None:
    created = {}
    for name, (content, _, _) in hostile_files().items():
        batch = openai_client.batches.create(
            input_file_id=upload(openai_client, content), endpoint="/v1/chat/completions", completion_window="24h"
        )
        created[name] = batch.id
    ordinary = create_chat_batch(openai_client, chat_lines(20))
    started = time.monotonic()
    done = wait_for_batch(openai_client, ordinary.id, timeout=60)
    took = time.monotonic() - started
    assert done.status == "completed" and done.request_counts.completed == 20, took

    print(f"\nordinary batch of 20 created after {len(created)} hostile ones: completed in {took:.2f} s")
    for name, (_, status, code) in hostile_files().items():
        batch = wait_for_batch(openai_client, created[name], timeout=10)
        first_error = batch.errors.data[0] if batch.errors and batch.errors.data else None
        print(f"{name}: {batch.status}", first_error and (first_error.code, first_error.line, first_error.message[:70]))
        assert batch.status == status, (name, batch.status, batch.errors)
        if code is None:
            continue
        assert batch.errors is not None and batch.errors.data, name
        assert batch.errors.data[0].code == code, (name, batch.errors.data[0])
        assert len(batch.errors.data) <= 101, name
        assert len(batch.model_dump_json()) < 64_000, name  # errors are bounded, whatever the file held
    bom = openai_client.batches.retrieve(created["BOM, CRLF and blank lines"])
    assert sorted(line["custom_id"] for line in read_result_file(openai_client, bom.output_file_id)) == ["a", "b"]


def pinned_header(provider_data: dict[str, str]) -> dict[str, str]:
    return {"X-LlamaStack-Provider-Data": json.dumps(provider_data)}


def test_provider_data_batches_run_beside_the_others(stack: ServerProcess, standin: StandInControl) -> None:
    """Batches side by side (the shipped default), those created with per-request credentials too:
    each batch's one request takes 1.2 s, and none waits for another to finish. (With
    `max_concurrent_batches` set they wait their turn in creation order: tests/unit/test_engine.py.)"""
    standin.configure(latency_mean=1.2, latency_sigma=0)
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=60)
    running = create_chat_batch(client, chat_lines(1))
    plain = create_chat_batch(client, chat_lines(1))
    headers = [pinned_header({"openai_api_key": "sk-test"}), pinned_header({"note": "no credential here"})]
    later = []
    for header in headers * 2:
        file_id = upload(client, json.dumps(chat_lines(1)[0]).encode())
        response = httpx.post(
            f"{stack.url}/v1/batches",
            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            headers=header,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        later.append(response.json()["id"])
    finished = {batch_id: wait_for_batch(client, batch_id, timeout=60) for batch_id in [running.id, plain.id, *later]}
    assert all(batch.status == "completed" for batch in finished.values())
    first_done = finished[running.id].completed_at
    assert first_done is not None
    for batch_id in [plain.id, *later]:  # started before the first batch's 1.2 s request was over
        assert finished[batch_id].in_progress_at <= first_done, batch_id
