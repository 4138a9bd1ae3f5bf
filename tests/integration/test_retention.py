"""Storage that stays bounded, on a real stack: result files (output and error) expire as
`output_expires_after` says (their `expires_at` set, then gone from retrieve, content and list,
though localfs deletes nothing itself), and a batch's record goes after its retention, leaving no
row of it in any table."""

import sqlite3
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, upload_jsonl, wait_for_batch
from tools.harness import ServerProcess, start_stack, warm_up

EXPIRES_AFTER_SECONDS = 3
RETENTION_SECONDS = 6.0


@pytest.fixture(scope="module")
def state(run_dir: Path) -> Path:
    return run_dir / f"retention-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def server(run_dir: Path, state: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    settings = {
        "BATCHES_MIN_OUTPUT_EXPIRY_SECONDS": "1",
        "BATCHES_SWEEP_INTERVAL_SECONDS": "0.5",
        "BATCHES_RETENTION_DAYS": str(RETENTION_SECONDS / 86400),
    }
    server = start_stack(run_dir, state, f"{standin_server.url}/v1", settings)
    warm_up(server)
    yield server
    server.stop()


def client_of(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)


def gone(check: object) -> bool:
    try:
        check()  # type: ignore[operator]
    except openai.NotFoundError:
        return True
    return False


def rows_naming(database: Path, batch_id: str) -> dict[str, int]:
    """Rows of each of the provider's tables that still name the batch."""
    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found = {}
        for table in (t for t in tables if t.startswith("batches")):
            columns = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
            for column in {"id", "batch_id", "key"} & set(columns):
                count = connection.execute(f"SELECT count(*) FROM {table} WHERE {column} LIKE ?", (f"%{batch_id}%",))
                found[f"{table}.{column}"] = count.fetchone()[0]
    return {name: count for name, count in found.items() if count}


def test_result_files_expire_then_the_record_goes_leaving_nothing(server: ServerProcess, state: Path) -> None:
    client = client_of(server)
    lines = [*chat_lines(3), {**chat_lines(1, suffix=" [[status:400]]")[0], "custom_id": "refused"}]
    batch = client.batches.create(
        input_file_id=upload_jsonl(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"output_expires_after": {"anchor": "created_at", "seconds": EXPIRES_AFTER_SECONDS}},
    )
    done = wait_for_batch(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    result_files = [done.output_file_id, done.error_file_id]
    assert all(result_files)
    for file_id in result_files:
        kept = client.files.retrieve(file_id)
        assert kept.expires_at == kept.created_at + EXPIRES_AFTER_SECONDS
    assert rows_naming(state / "sql.db", batch.id)  # while kept, the store has it
    deadline = time.monotonic() + 30
    for file_id in result_files:
        while not gone(partial(client.files.retrieve, file_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
    for file_id in result_files:
        assert gone(partial(client.files.retrieve, file_id))
        assert gone(partial(client.files.content, file_id))
    listed = [f.id for f in client.files.list(limit=10000)]
    assert not set(result_files) & set(listed)
    assert client.batches.retrieve(batch.id).id == batch.id  # the record outlives its files
    while not gone(lambda: client.batches.retrieve(batch.id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(lambda: client.batches.retrieve(batch.id))
    assert rows_naming(state / "sql.db", batch.id) == {}


@pytest.mark.parametrize(
    ("expires_after", "param", "code"),
    [
        ({"anchor": "created_at", "seconds": 0}, "output_expires_after.seconds", "integer_below_min_value"),
        ({"anchor": "created_at", "seconds": 2592001}, "output_expires_after.seconds", "integer_above_max_value"),
        ({"anchor": "last_active_at", "seconds": 3600}, "output_expires_after.anchor", "invalid_value"),
        ({"seconds": 3600}, "output_expires_after.anchor", "missing_required_parameter"),
        ({"anchor": "created_at", "seconds": "1h"}, "output_expires_after.seconds", "invalid_type"),
        ("soon", "output_expires_after", "invalid_type"),
    ],
)
def test_a_bad_output_expiry_is_refused_as_openai_does(
    server: ServerProcess, expires_after: object, param: str, code: str
) -> None:
    client = client_of(server)
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=upload_jsonl(client, chat_lines(1)),
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"output_expires_after": expires_after},
        )
    assert (refused.value.body["param"], refused.value.body["code"]) == (param, code)  # type: ignore[index]
