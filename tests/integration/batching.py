"""Helpers for integration tests: input files, waiting for batches, reading result files."""

import json
import time
import uuid
from typing import Any

from openai import OpenAI
from openai.types import Batch

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_lines(count: int, tag: str | None = None, suffix: str = "") -> list[dict[str, Any]]:
    """`count` chat requests whose prompts are unique to this call (to count them at the stand-in)."""
    tag = tag or uuid.uuid4().hex[:8]
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "local/m-chat", "messages": [{"role": "user", "content": f"{tag} question {i}{suffix}"}]},
        }
        for i in range(count)
    ]


def upload_jsonl(client: OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    content = lines if isinstance(lines, bytes) else "\n".join(json.dumps(line) for line in lines).encode()
    return client.files.create(file=("input.jsonl", content), purpose="batch").id


def create_chat_batch(client: OpenAI, lines: list[dict[str, Any]] | bytes, **options: Any) -> Batch:
    file_id = upload_jsonl(client, lines)
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **options
    )


def wait_for_batch(client: OpenAI, batch_id: str, timeout: float = 60, until: set[str] = TERMINAL) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s")
        time.sleep(0.1)


def read_result_file(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(raw) for raw in client.files.content(file_id).text.splitlines() if raw.strip()]
