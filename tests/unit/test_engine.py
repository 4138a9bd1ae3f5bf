"""Scheduling batch jobs: the concurrency limit across batches, retries after internal errors, and
several servers (replicas) sharing one SQL store: work spreading, cancels and lost leases."""

import asyncio
import time
from typing import Any

import pytest

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService
from llama_stack_provider_batches.idempotency import CreateParams
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels
from tests.unit.helpers import (
    CHAT,
    chat_line,
    jsonl,
    provider_with,
    read_lines,
    run_batch,
    start_batch,
    wait_until_completed,
)


async def test_batches_beyond_the_limit_wait_their_turn(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    provider = await provider_with(config, files, inference, models, max_concurrent_batches=1)
    gate = asyncio.Event()

    async def hold(_: dict[str, Any]) -> None:
        await gate.wait()

    inference.behaviour = hold
    first = await provider.create_batch(
        input_file_id=files.add(jsonl([chat_line("a")])), endpoint=CHAT, completion_window="24h"
    )
    second = await provider.create_batch(
        input_file_id=files.add(jsonl([chat_line("b")])), endpoint=CHAT, completion_window="24h"
    )
    await asyncio.sleep(0.2)
    assert (await provider.retrieve_batch(first.id)).status == "in_progress"
    assert (await provider.retrieve_batch(second.id)).status == "validating"
    gate.set()
    await provider._runner.wait_idle()
    assert (await provider.retrieve_batch(second.id)).status == "completed"
    await provider.shutdown()


async def test_an_internal_error_is_retried_without_losing_results(
    provider: BatchesService, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_stack_provider_batches import engine

    monkeypatch.setattr(engine, "RETRY_DELAYS_SECONDS", (0.01,))
    real_upload = files.openai_upload_file
    failures = []

    async def flaky_upload(request: Any, file: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OSError("disk full")
        return await real_upload(request, file)

    monkeypatch.setattr(files, "openai_upload_file", flaky_upload)
    batch = await run_batch(provider, files, [chat_line(f"r{i}") for i in range(5)])
    assert failures == [1]
    assert batch.status == "completed"
    assert len(read_lines(files, batch.output_file_id)) == 5


async def test_a_server_stop_leaves_batches_resumable_and_a_start_resumes_them(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    async def slow(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)

    inference.behaviour = slow
    first = await provider_with(config, files, inference, models, shutdown_grace_seconds=2)
    running = await start_batch(first, files, 100)
    waiting = await first.create_batch(
        input_file_id=files.add(jsonl([chat_line("w")])), endpoint=CHAT, completion_window="24h"
    )
    await wait_until_completed(first, running.id, 20)
    await first.shutdown()
    stopped = await first.retrieve_batch(running.id)
    assert stopped.status == "in_progress"
    assert (await first.retrieve_batch(waiting.id)).status == "validating"
    assert stopped.request_counts.completed == len(inference.calls)  # in-flight requests finished and were stored

    second = await provider_with(config, files, inference, models)
    second.start()  # as on the serving loop's first refresh
    await second._runner.wait_idle()
    done = await second.retrieve_batch(running.id)
    assert done.status == "completed"
    assert sorted(line["custom_id"] for line in read_lines(files, done.output_file_id)) == sorted(
        f"r{i}" for i in range(100)
    )
    assert len(inference.calls) == 101  # nothing ran twice
    assert (await second.retrieve_batch(waiting.id)).status == "completed"
    assert await second._store.active_ids() == []
    assert second._runner.running() == []
    await second.shutdown()


async def test_claims_are_retried_while_the_store_fails(
    provider: BatchesService, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_stack_provider_batches import engine

    monkeypatch.setattr(engine, "RETRY_DELAYS_SECONDS", (0.01,))
    params = CreateParams(files.add(jsonl([chat_line("a")])), CHAT, "24h", None)
    stored, _ = await provider._store.create(provider._new_batch(params, owner=None, key=None))  # as before a restart
    real_claim = provider._store.claim
    failures: list[int] = []

    async def flaky_claim(*args: Any) -> list[Any]:
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("store not reachable yet")
        return await real_claim(*args)

    monkeypatch.setattr(provider._store, "claim", flaky_claim)
    provider.start()
    await provider._runner.wait_idle()
    assert failures == [1, 1]
    assert (await provider.retrieve_batch(stored.batch.id)).status == "completed"


# --- several servers on one SQL store -----------------------------------------------------------


async def test_idle_replicas_pick_up_waiting_batches(
    replica_config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    gate = asyncio.Event()

    async def hold(_: dict[str, Any]) -> None:
        await gate.wait()

    inference.behaviour = hold
    first = await provider_with(replica_config, files, inference, models)
    second = await provider_with(replica_config, files, inference, models)
    second.start()
    batches = [
        await first.create_batch(
            input_file_id=files.add(jsonl([chat_line(f"{n}")])), endpoint=CHAT, completion_window="24h"
        )
        for n in range(2)
    ]
    # One batch at a time each: the second server takes whichever the first is not running at its
    # next look (every second).
    for _ in range(40):
        if first._runner.running() and second._runner.running():
            break
        await asyncio.sleep(0.05)
    assert sorted(first._runner.running() + second._runner.running()) == sorted(b.id for b in batches)
    gate.set()
    for provider in (first, second):
        await provider._runner.wait_idle()
    assert [(await second.retrieve_batch(b.id)).status for b in batches] == ["completed", "completed"]
    await first.shutdown()
    await second.shutdown()


async def test_a_cancel_through_another_replica_stops_the_batch_where_it_runs(
    replica_config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    inference.stall_after(3)
    running_here = await provider_with(replica_config, files, inference, models, cancel_grace_seconds=0.1)
    elsewhere = await provider_with(replica_config, files, inference, models)
    batch = await start_batch(running_here, files, 10)
    while len(inference.calls) < 4:
        await asyncio.sleep(0.01)
    cancelled_at = time.monotonic()
    await elsewhere.cancel_batch(batch.id)
    await running_here._runner.wait_idle()
    assert time.monotonic() - cancelled_at < 2  # a heartbeat (0.2 s here) and the grace period
    final = await elsewhere.retrieve_batch(batch.id)
    assert final.status == "cancelled" and final.request_counts.completed == 3
    await running_here.shutdown()
    await elsewhere.shutdown()


async def test_a_job_that_loses_its_lease_stops_and_the_next_holder_finishes_the_batch(
    replica_config: BatchesProviderConfig,
    files: FakeFiles,
    inference: FakeInference,
    models: FakeModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inference.stall_after(5)
    first = await provider_with(replica_config, files, inference, models)
    batch = await start_batch(first, files, 20)
    await wait_until_completed(first, batch.id, 5)

    async def cut_off(*_: Any) -> None:  # as if the database said another server holds the lease
        return None

    monkeypatch.setattr(first._store, "renew", cut_off)
    monkeypatch.setattr(first._store, "claim", lambda *_: asyncio.sleep(0, result=[]))
    await asyncio.wait_for(first._runner.wait_idle(), timeout=5)  # stops without writing anything
    assert (await first.retrieve_batch(batch.id)).status == "in_progress"

    inference.behaviour = None
    second = await provider_with(replica_config, files, inference, models)
    second.start()  # claims the batch once the stale lease expires (1 s)
    while (await second.retrieve_batch(batch.id)).status != "completed":
        await asyncio.sleep(0.1)
    final = await second.retrieve_batch(batch.id)
    assert sorted(line["custom_id"] for line in read_lines(files, final.output_file_id)) == sorted(
        f"r{i}" for i in range(20)
    )
    assert final.request_counts.completed == 20
    await first.shutdown()
    await second.shutdown()


async def test_setting_sql_store_on_a_single_server_keeps_its_batches(
    config: BatchesProviderConfig,
    replica_config: BatchesProviderConfig,
    files: FakeFiles,
    inference: FakeInference,
    models: FakeModels,
) -> None:
    inference.stall_after(5)
    single = await provider_with(config, files, inference, models, shutdown_grace_seconds=0.1)
    finished = await run_batch(single, files, [chat_line("f0")])
    inference.calls.clear()
    running = await start_batch(single, files, 20)
    await wait_until_completed(single, running.id, 5)
    await single.shutdown()  # the operator adds `sql_store` to run.yaml and restarts

    inference.behaviour = None
    calls_before = len(inference.calls)
    replica = await provider_with(replica_config, files, inference, models)
    replica.start()
    await replica._runner.wait_idle()
    done = await replica.retrieve_batch(running.id)
    assert done.status == "completed" and done.request_counts.completed == 20
    assert sorted(line["custom_id"] for line in read_lines(files, done.output_file_id)) == sorted(
        f"r{i}" for i in range(20)
    )
    assert len(inference.calls) - calls_before == 15  # the 5 stored results were not asked again
    assert (await replica.retrieve_batch(finished.id)).status == "completed"
    await replica.shutdown()


async def test_a_server_that_cannot_renew_its_lease_stops_once_the_lease_may_have_passed(
    replica_config: BatchesProviderConfig,
    files: FakeFiles,
    inference: FakeInference,
    models: FakeModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inference.stall_after(3)
    provider = await provider_with(replica_config, files, inference, models)  # leases of 1 s
    batch = await start_batch(provider, files, 10)
    while len(inference.calls) < 4:
        await asyncio.sleep(0.01)

    async def unreachable(*_: Any) -> None:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(provider._store, "renew", unreachable)
    monkeypatch.setattr(provider._store, "claim", lambda *_: asyncio.sleep(0, result=[]))
    cut_off_at = time.monotonic()
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=5)
    assert time.monotonic() - cut_off_at <= 1.5  # within the lease, plus a heartbeat
    assert (await provider.retrieve_batch(batch.id)).status == "in_progress"  # left to whoever claims it next
    await provider.shutdown()
