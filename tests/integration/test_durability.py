"""A server that dies or stops mid-batch loses nothing and repeats almost nothing.

Each test starts its own stack over fresh state, runs a batch against the stand-in with some
latency, stops the stack (SIGKILL or SIGTERM) part-way, starts it again on the same state, and
checks the finished batch and what the stand-in received. The repeat counts measured are written
to `durability.json` in the test session's directory.
"""

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, record, wait_for_batch
from tools.harness import (
    ServerProcess,
    StandInControl,
    run_yaml_with_sql_store,
    server_up,
    start_stack,
    warm_up,
)

WINDOW = 10
# Three shards: a stop a third of the way through lands inside the second, with requests in flight.
REQUESTS_PER_SHARD = 300
REQUESTS = 3 * REQUESTS_PER_SHARD
LATENCY = 0.05
FINALIZED_REQUESTS = 1200  # the batch a crash interrupts while it is finalizing


@dataclass
class Restartable:
    """A stack that a test may stop and start again on the same state."""

    run_dir: Path
    state_dir: Path
    model_url: str
    env: dict[str, str]
    run_yaml: Path
    server: ServerProcess | None = None

    def start(self) -> OpenAI:
        self.server = start_stack(self.run_dir, self.state_dir, self.model_url, self.env, run_yaml=self.run_yaml)
        warm_up(self.server)
        return OpenAI(base_url=f"{self.server.url}/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self, sig: signal.Signals) -> None:
        assert self.server is not None
        self.server.stop(sig)


@pytest.fixture
def restartable(run_dir: Path, standin_server: ServerProcess, request: pytest.FixtureRequest) -> Iterator[Restartable]:
    backend = getattr(request, "param", "sqlite")
    if backend == "postgres" and not server_up(5432):
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    name = f"{request.node.name}-{uuid.uuid4().hex[:6]}".replace("[", "-").replace("]", "")
    env = {
        "BATCHES_MAX_CONCURRENT_REQUESTS": str(WINDOW),
        "BATCHES_REQUESTS_PER_SHARD": str(REQUESTS_PER_SHARD),
        "BATCHES_KV_NAMESPACE": f"batches-{uuid.uuid4().hex}",
    }
    stack = Restartable(
        run_dir, run_dir / name, f"{standin_server.url}/v1", env, run_yaml_with_sql_store(run_dir, backend)
    )
    yield stack
    if stack.server is not None:
        stack.stop(signal.SIGKILL)


def wait_until_completed(client: OpenAI, batch_id: str, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.request_counts.completed >= at_least:
            return batch.request_counts.completed
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} requests completed in {timeout} s")


def check_results_and_count_repeats(client: OpenAI, batch_id: str, lines: list[dict], standin: StandInControl) -> dict:
    """Every custom_id exactly once across the files; returns what the stand-in received twice."""
    batch = wait_for_batch(client, batch_id, timeout=180)
    assert batch.status == "completed", batch
    output = read_result_file(client, batch.output_file_id)
    errors = read_result_file(client, batch.error_file_id) if batch.error_file_id else []
    seen = [line["custom_id"] for line in output + errors]
    assert len(seen) == len(set(seen)) == len(lines)
    assert set(seen) == {line["custom_id"] for line in lines}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
    received = standin.stats()["by_prompt"]
    sent = [received.get(line["body"]["messages"][0]["content"], 0) for line in lines]
    assert min(sent) >= 1
    assert max(sent) <= 2, "a request was sent more than twice"
    return {"requests": len(lines), "repeated": sum(count - 1 for count in sent), "errors": len(errors)}


def stop_a_third_through(restartable: Restartable, standin: StandInControl, sig: signal.Signals) -> tuple:
    """Start the stack, run a batch, and stop the stack with `sig` once a third of it is done."""
    standin.configure(latency_mean=LATENCY)
    client = restartable.start()
    lines = chat_lines(REQUESTS)
    batch = create_chat_batch(client, lines)
    # Mid-shard: a stop at a shard's end would find nothing in flight.
    done_at_stop = wait_until_completed(client, batch.id, REQUESTS // 3 + REQUESTS // 10)
    restartable.stop(sig)
    return batch, lines, done_at_stop


@pytest.mark.parametrize("restartable", ["sqlite", "postgres"], indirect=True)
def test_sigkill_mid_run_repeats_at_most_the_requests_in_flight(
    restartable: Restartable, standin: StandInControl, run_dir: Path
) -> None:
    batch, lines, done_at_kill = stop_a_third_through(restartable, standin, signal.SIGKILL)

    client = restartable.start()
    figures = check_results_and_count_repeats(client, batch.id, lines, standin)
    # Repeated: the requests in flight, and those whose results were not yet stored (one write interval).
    assert figures["repeated"] <= 2 * WINDOW
    record(
        run_dir,
        "durability.json",
        f"sigkill-{restartable.run_yaml.stem}",
        {**figures, "completed_when_killed": done_at_kill},
    )


def test_sigterm_lets_requests_in_flight_finish_and_repeats_nothing(
    restartable: Restartable, standin: StandInControl, run_dir: Path
) -> None:
    batch, lines, _ = stop_a_third_through(restartable, standin, signal.SIGTERM)
    assert restartable.server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal

    client = restartable.start()
    stopped = client.batches.retrieve(batch.id)
    assert stopped.status in ("in_progress", "completed"), "a server stop must not end a batch"
    figures = check_results_and_count_repeats(client, batch.id, lines, standin)
    assert figures["repeated"] == 0
    record(run_dir, "durability.json", "sigterm", figures)


def test_a_crash_while_finalizing_leaves_one_output_and_one_error_file(
    restartable: Restartable, standin: StandInControl, run_dir: Path
) -> None:
    client = restartable.start()
    attempts = 0
    while attempts < 5:
        attempts += 1
        # Long prompts (the stand-in echoes them) make result files, and so finalizing, take long
        # enough to be caught, with few requests to send.
        lines = chat_lines(FINALIZED_REQUESTS, suffix=" " + "padding " * 128)
        for line in lines[:20]:
            line["body"]["messages"][0]["content"] += " [[status:400]]"
        batch = create_chat_batch(client, lines)
        until = {"finalizing", "completed"}
        status = wait_for_batch(client, batch.id, timeout=120, until=until, poll_seconds=0.02).status
        if status == "finalizing":
            break
        # Finalizing was too quick to catch: try again with a new batch.
    if status != "finalizing":
        pytest.fail("never caught a batch while it was finalizing")
    restartable.stop(signal.SIGKILL)

    client = restartable.start()
    figures = check_results_and_count_repeats(client, batch.id, lines, standin)
    finished = client.batches.retrieve(batch.id)
    names = [f.filename for f in client.files.list(purpose="batch", limit=10000)]
    record(
        run_dir,
        "durability.json",
        "sigkill-while-finalizing",
        {
            **figures,
            "attempts": attempts,
            "output_files_uploaded": names.count(f"{batch.id}_output.jsonl"),
            "error_files_uploaded": names.count(f"{batch.id}_error.jsonl"),
        },
    )
    assert figures["errors"] == 20
    assert finished.output_file_id and finished.error_file_id


def test_a_batch_whose_input_is_deleted_before_a_restart_accounts_for_every_request(
    restartable: Restartable, standin: StandInControl
) -> None:
    standin.configure(latency_mean=LATENCY, latency_sigma=0)
    client = restartable.start()
    batch = create_chat_batch(client, chat_lines(1_000))
    while client.batches.retrieve(batch.id).request_counts.completed < 100:
        time.sleep(0.05)
    client.files.delete(batch.input_file_id)  # the running job still has what it read
    restartable.stop(signal.SIGTERM)
    client = restartable.start()
    final = wait_for_batch(client, batch.id, timeout=60)
    assert final.status == "failed"
    assert final.errors is not None and [e.code for e in final.errors.data] == ["input_file_unavailable"]
    output = read_result_file(client, final.output_file_id)
    errors = read_result_file(client, final.error_file_id)
    assert {line["error"]["code"] for line in errors} == {"input_file_unavailable"}
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"req-{i}" for i in range(1_000))
    counts = final.request_counts
    assert (counts.completed, counts.failed, counts.total) == (len(output), len(errors), 1_000)
