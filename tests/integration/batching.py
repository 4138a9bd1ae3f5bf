"""Helpers for integration tests: input files, waiting for batches, reading result files."""

import json
import time
import uuid
from pathlib import Path
from typing import Any

from openai import OpenAI
from openai.types import Batch

from tools.harness import StandInControl

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_lines(
    count: int, tag: str | None = None, suffix: str = "", model: str = "local/m-chat"
) -> list[dict[str, Any]]:
    """`count` chat requests to `model` whose prompts are unique to this call (to count them at the stand-in)."""
    tag = tag or uuid.uuid4().hex[:8]
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"{tag} question {i}{suffix}"}]},
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


def wait_for_batch(
    client: OpenAI, batch_id: str, timeout: float = 60, until: set[str] = TERMINAL, poll_seconds: float = 0.1
) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s")
        time.sleep(poll_seconds)


def read_result_file(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(raw) for raw in client.files.content(file_id).text.splitlines() if raw.strip()]


def record(run_dir: Path, measurements: str, case: str, figures: dict[str, Any]) -> None:
    """Add `figures` as `case` to the JSON file `measurements` (in the test session's directory), and print them."""
    path = run_dir / measurements
    measured = json.loads(path.read_text()) if path.exists() else {}
    measured[case] = figures
    path.write_text(json.dumps(measured, indent=2))
    print(f"\n{case}: {figures}")


def sent_per_request(standin: StandInControl, lines: list[dict[str, Any]]) -> list[int]:
    """How many times the stand-in received each line's request (its prompt is unique to the line)."""
    received = standin.stats()["by_prompt"]
    return [received.get(line["body"]["messages"][0]["content"], 0) for line in lines]
