"""The stack's own `server.workers: 2`: uvicorn runs two worker processes behind one port, each
building its own batches provider over the same SQLite stores of the shipped run.yaml. A batch must
still be sent to the model once per request and complete with every custom_id once, and a worker
killed mid-batch must neither lose the batch nor have it sent again beyond what was in flight.

What the stand-in received is counted per prompt (each request's prompt is unique), and the
figures measured are written to `workers.json` in the test session's directory.
"""

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types import Batch

from tests.integration.batching import (
    chat_lines,
    create_chat_batch,
    read_result_file,
    record,
    sent_per_request,
    upload_jsonl,
    wait_for_batch,
)
from tools.harness import (
    ServerProcess,
    StandInControl,
    connections_to_port,
    cpu_seconds,
    run_yaml_with_workers,
    start_stack,
    stop_stack_and_workers,
    wait_for_workers,
    warm_up,
    worker_pids,
)

WORKERS = 2
WINDOW = 10  # requests of one batch in flight (max_concurrent_requests_per_batch)
REQUESTS_PER_SHARD = 300  # a batch of 2 * REQUESTS_PER_SHARD runs as two shards, one per worker
REQUESTS = 2 * REQUESTS_PER_SHARD
CREATES = 100  # batches created at once from 16 threads, racing both workers' claim loops
LEASE_SECONDS = 3  # how soon a batch held by a killed worker may be taken over


def start_workers_stack(run_dir: Path, model_url: str, lease_seconds: float | None = None) -> ServerProcess:
    """A stack with WORKERS workers over fresh SQLite state, both workers up, tables created."""
    tag = uuid.uuid4().hex[:6]
    directory = run_dir / f"workers-{tag}"
    directory.mkdir()
    run_yaml = run_yaml_with_workers(directory, WORKERS)
    env = {"BATCHES_MAX_CONCURRENT_REQUESTS": str(WINDOW), "BATCHES_REQUESTS_PER_SHARD": str(REQUESTS_PER_SHARD)}
    if lease_seconds is not None:
        env["BATCHES_LEASE_SECONDS"] = f"{lease_seconds:g}"
    stack = start_stack(run_dir, directory / "state", model_url, env, run_yaml=run_yaml)
    try:
        wait_for_workers(stack, WORKERS)
        warm_up(stack)
    except BaseException:
        stop_stack_and_workers(stack)
        raise
    return stack


@pytest.fixture(scope="module")
def workers_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    """Two workers with the shipped run.yaml (SQLite, no sql_store), for the whole module."""
    stack = start_workers_stack(run_dir, f"{standin_server.url}/v1")
    yield stack
    stop_stack_and_workers(stack)


@pytest.fixture
def short_lease_workers_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    """Two workers with the shipped run.yaml and a 3 s lease, for one test that kills a worker."""
    stack = start_workers_stack(run_dir, f"{standin_server.url}/v1", lease_seconds=LEASE_SECONDS)
    yield stack
    stop_stack_and_workers(stack)


def client_of(stack: ServerProcess) -> OpenAI:
    # Retries: a connection kept alive to a worker that was killed fails once.
    return OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=3, timeout=60)


def outcome(client: OpenAI, final: Batch, lines: list[dict[str, Any]], standin: StandInControl) -> dict[str, Any]:
    """The figures of a finished batch: its status and counts, its output, what the model received."""
    time.sleep(1)  # let requests still in flight anywhere reach the stand-in's counters
    output = read_result_file(client, final.output_file_id) if final.output_file_id else []
    ids = [line["custom_id"] for line in output]
    sent = sent_per_request(standin, lines)
    return {
        "requests": len(lines),
        "status": final.status,
        "completed": final.request_counts.completed,
        "failed": final.request_counts.failed,
        "output_lines": len(ids),
        "distinct_custom_ids_in_output": len(set(ids)),
        "output_matches_input": sorted(ids) == sorted(line["custom_id"] for line in lines),
        "model_requests": sum(sent),
        "never_sent": sent.count(0),
        "sent_more_than_once": sum(1 for count in sent if count > 1),
        "most_sends_of_one_request": max(sent),
    }


def wait_for_progress(client: OpenAI, batch_id: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.request_counts.completed >= at_least or batch.status not in ("validating", "in_progress"):
            return batch.request_counts.completed
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} requests of {batch_id} completed in {timeout} s")


def busiest_worker(stack: ServerProcess, model_port: int) -> tuple[int, dict[str, Any]]:
    """The worker running the batch: the one holding connections to the model, else the one using CPU."""
    pids = worker_pids(stack)
    connections = {pid: connections_to_port(pid, model_port) for pid in pids}
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(0.5)
    cpu = {pid: round(cpu_seconds(pid) - before[pid], 2) for pid in pids}
    chosen = max(pids, key=lambda pid: (connections[pid], cpu[pid]))
    return chosen, {"connections_to_model": connections, "cpu_s_in_half_a_second": cpu}


def test_a_batch_on_two_workers_is_sent_once_per_request_and_completes(
    workers_stack: ServerProcess, standin: StandInControl, run_dir: Path
) -> None:
    assert len(worker_pids(workers_stack)) == WORKERS
    standin.configure(latency_mean=0.02, latency_sigma=0)  # 2 shards of 300 requests: about 0.6 s each
    client = client_of(workers_stack)
    lines = chat_lines(REQUESTS)
    started = time.monotonic()
    batch = create_chat_batch(client, lines)
    final = wait_for_batch(client, batch.id, timeout=180)
    figures = {"seconds": round(time.monotonic() - started, 1), **outcome(client, final, lines, standin)}
    record(run_dir, "workers.json", "two_workers", figures)

    assert final.status == "completed", figures
    assert (final.request_counts.completed, final.request_counts.failed) == (REQUESTS, 0), figures
    assert figures["output_lines"] == figures["distinct_custom_ids_in_output"] == REQUESTS, figures
    assert figures["output_matches_input"], figures
    assert figures["model_requests"] == REQUESTS and figures["most_sends_of_one_request"] == 1, figures
    processes = Counter(run["process"] for run in workers_stack.shard_runs(batch.id) if run["stop"] == "done")
    record(run_dir, "workers.json", "two_workers_shards", dict(processes))
    assert sum(processes.values()) == 2, processes  # 2 shards, each run once
    assert len(processes) == 2, processes  # one batch, on both workers


def test_a_worker_killed_mid_batch_loses_nothing_and_repeats_at_most_what_was_in_flight(
    short_lease_workers_stack: ServerProcess, standin: StandInControl, run_dir: Path
) -> None:
    stack = short_lease_workers_stack
    standin.configure(latency_mean=0.1, latency_sigma=0)  # 600 requests, 10 at a time: about 6 s
    client = client_of(stack)
    lines = chat_lines(REQUESTS)
    batch = create_chat_batch(client, lines)
    done_at_kill = wait_for_progress(client, batch.id, len(lines) // 3, timeout=60)

    model_port = int(standin.url.rsplit(":", 1)[1])
    victim, evidence = busiest_worker(stack, model_port)
    survivors = [pid for pid in worker_pids(stack) if pid != victim]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    final = wait_for_batch(client, batch.id, timeout=120)
    figures = {
        "completed_when_killed": done_at_kill,
        "killed_worker": victim,
        **evidence,
        "seconds_after_kill": round(time.monotonic() - killed_at, 1),
        "workers_after": worker_pids(stack),
        **outcome(client, final, lines, standin),
    }
    record(run_dir, "workers.json", "two_workers_one_killed", figures)

    assert set(survivors) <= set(figures["workers_after"]), "the other worker died too"
    assert final.status == "completed", figures
    assert (final.request_counts.completed, final.request_counts.failed) == (REQUESTS, 0), figures
    assert figures["output_lines"] == figures["distinct_custom_ids_in_output"] == REQUESTS, figures
    assert figures["output_matches_input"], figures
    assert figures["never_sent"] == 0, figures
    # Repeated at most: the requests in flight in the killed worker, and one unwritten group of results.
    assert figures["model_requests"] <= len(lines) + 2 * WINDOW, figures
    assert figures["most_sends_of_one_request"] <= 2, figures


def test_a_hundred_creates_from_many_threads_on_two_workers_all_end_and_list_once(
    workers_stack: ServerProcess, standin: StandInControl, run_dir: Path
) -> None:
    """Creates race the claim loops of both workers (each runs up to one batch and helps with none
    here, the batches being one shard each): none is left behind, none listed twice."""
    standin.configure(latency_mean=0.002, latency_sigma=0)
    client = client_of(workers_stack)
    file_id = upload_jsonl(client, chat_lines(2))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        created = list(
            pool.map(
                lambda _: (
                    client.batches.create(
                        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                    ).id
                ),
                range(CREATES),
            )
        )
    finals = [wait_for_batch(client, batch_id, timeout=240) for batch_id in created]
    listed: list[str] = []
    page = client.batches.list(limit=100)
    listed.extend(batch.id for batch in page.data)
    while page.has_more:
        page = client.batches.list(limit=100, after=page.data[-1].id)
        listed.extend(batch.id for batch in page.data)
    figures = {
        "batches": len(created),
        "seconds": round(time.monotonic() - started, 1),
        "statuses": dict(Counter(batch.status for batch in finals)),
        "listed": len(listed),
        "listed_distinct": len(set(listed)),
    }
    record(run_dir, "workers.json", f"two_workers_{CREATES}_creates", figures)
    assert figures["statuses"] == {"completed": CREATES}, figures
    assert set(created) <= set(listed) and len(listed) == len(set(listed)), figures
