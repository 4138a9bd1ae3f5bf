"""`llama-batches rerun` against a real stack: an expired batch run again to completion gives one
output with every custom_id once in input order, and requests the model refused (400) stay as they were."""

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, upload_jsonl, wait_for_batch
from tests.processes import llama_batches
from tools.harness import ServerProcess, StandInControl, start_stack, warm_up

WINDOW_SECONDS = 4  # every batch of this stack expires 4 s after its create
REFUSED = {"req-1", "req-7", "req-12"}  # the stand-in answers these with HTTP 400


@pytest.fixture(scope="module")
def expiring_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    env = {
        "BATCHES_KV_NAMESPACE": f"batches-{uuid.uuid4().hex}",
        "BATCHES_COMPLETION_WINDOW_SECONDS": str(WINDOW_SECONDS),
        "BATCHES_MAX_CONCURRENT_REQUESTS": "2",
    }
    state = run_dir / f"rerun-state-{uuid.uuid4().hex[:6]}"
    stack = start_stack(run_dir, state, f"{standin_server.url}/v1", env)
    warm_up(stack)
    yield stack
    stack.stop()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text().splitlines() if raw.strip()]


def expired_batch(stack: ServerProcess, standin: StandInControl) -> tuple[OpenAI, str, list[str]]:
    """A batch of 30 requests at 0.5 s each, two at a time, that expires after about 16 of them."""
    lines = chat_lines(30)
    for line in lines:
        if line["custom_id"] in REFUSED:
            line["body"]["messages"][0]["content"] += " [[status:400]]"
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=60)
    standin.configure(latency_mean=0.5)
    batch = client.batches.create(
        input_file_id=upload_jsonl(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    ended = wait_for_batch(client, batch.id, timeout=60)
    assert ended.status == "expired" and 0 < ended.request_counts.completed < 27, ended
    return client, batch.id, [line["custom_id"] for line in lines]


def test_an_expired_batch_rerun_to_completion_gives_every_request_once_in_input_order(
    expiring_stack: ServerProcess, standin: StandInControl, tmp_path: Path
) -> None:
    client, batch_id, custom_ids = expired_batch(expiring_stack, standin)
    first = client.batches.retrieve(batch_id)
    standin.configure(latency_mean=0)  # the backend is fast again: the re-run finishes within its window
    output = tmp_path / "all.jsonl"

    result = llama_batches(f"{expiring_stack.url}/v1", "rerun", batch_id, "-o", output)

    assert result.returncode == 1, result.stderr  # completed, with the three refused requests failed
    errors = [json.loads(line) for line in client.files.content(first.error_file_id).text.splitlines()]
    reran = sum(1 for line in errors if (line["error"] or {}).get("code") == "batch_expired")
    assert reran > 0
    assert f"Re-running {reran} of the 30 requests of batch {batch_id}: {reran} expired." in result.stderr
    lines = read_jsonl(output)
    assert [line["custom_id"] for line in lines] == custom_ids
    refused = {line["custom_id"] for line in lines if line["response"]["status_code"] == 400}
    assert refused == REFUSED
    assert all(line["response"]["status_code"] == 200 for line in lines if line["custom_id"] not in REFUSED)
    assert "27 succeeded, 3 failed" in result.stdout

    # Once everything stands, there is nothing left to run again in the new batch; the same command
    # re-attaches to the batch it created instead of making another.
    rerun_id = next(b.id for b in client.batches.list(limit=5) if (b.metadata or {}).get("llama_batches_rerun_of"))
    nothing = llama_batches(f"{expiring_stack.url}/v1", "rerun", rerun_id, "-o", tmp_path / "none.jsonl")
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == (
        f"error: batch {rerun_id}: nothing to re-run: every one of its {reran} requests has a final result"
    )
    again = llama_batches(f"{expiring_stack.url}/v1", "rerun", batch_id, "-o", tmp_path / "again.jsonl")
    assert again.returncode == 1 and f"Re-attached to batch {rerun_id}" in again.stderr
    assert (tmp_path / "again.jsonl").read_text() == output.read_text()


def test_a_running_batch_is_not_rerun(expiring_stack: ServerProcess, standin: StandInControl, tmp_path: Path) -> None:
    client = OpenAI(base_url=f"{expiring_stack.url}/v1", api_key="none", max_retries=0, timeout=60)
    standin.configure(latency_mean=0.5)
    batch = client.batches.create(
        input_file_id=upload_jsonl(client, chat_lines(30)), endpoint="/v1/chat/completions", completion_window="24h"
    )
    result = llama_batches(f"{expiring_stack.url}/v1", "rerun", batch.id, "-o", tmp_path / "out.jsonl")
    assert result.returncode == 2 and result.stderr.startswith(f"error: batch {batch.id} is ")
    assert "re-run it once it has ended" in result.stderr
    wait_for_batch(client, batch.id, timeout=60)
