"""Shards: a batch split into ranges that any process with a free slot runs under a lease of its own.
Two providers on one store stand for two worker processes (each with its own Inference fake, to
tell who sent what)."""

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_stack_provider_batches import BatchesProviderConfig
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.storage.shards import split
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels, ProviderFactory, provider_with
from tests.unit.helpers import chat_line, create_chat_batch, make_batch, read_lines, wait_for_status


@settings(deadline=None)  # 100,000 one-request shards take a while on a loaded machine
@given(total=st.integers(min_value=0, max_value=100_000), size=st.integers(min_value=1, max_value=5_000))
def test_shards_cover_every_request_once_in_order(total: int, size: int) -> None:
    ranges = split(total, size)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(end == next_first for (_, end), (next_first, _) in itertools.pairwise(ranges))
    assert all(0 < end - first <= size for first, end in ranges) or total == 0
    assert len(ranges) == max(1, -(-total // size))


# Starts two servers over one store: `servers, inferences = await two_processes(**settings)`.
TwoProcesses = Callable[..., Awaitable[tuple[list[Any], list[FakeInference]]]]


@pytest.fixture
async def two_processes(
    replica_config: BatchesProviderConfig, files: FakeFiles, models: FakeModels
) -> AsyncIterator[TwoProcesses]:
    """Starts two servers sharing the store, each with an Inference fake of its own, with some settings
    changed; shuts them down after the test."""
    started: list[Any] = []

    async def start(**settings: Any) -> tuple[list[Any], list[FakeInference]]:
        inferences = [FakeInference(), FakeInference()]
        servers = [
            await provider_with(replica_config, files, inference, models, **settings) for inference in inferences
        ]
        started.extend(servers)
        return servers, inferences

    yield start
    for server in started:
        await server.shutdown()


async def start_distinct(provider: Any, files: FakeFiles, requests: int) -> Any:
    """A batch of requests r0, r1, ... whose prompts differ, so that the model's calls can be told apart."""
    return await create_chat_batch(provider, files, [chat_line(f"r{i}", f"question {i}") for i in range(requests)])


async def until(condition: Any, seconds: float = 10) -> None:
    """Wait until `condition()` holds; fail after `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not hold in time")


async def start_helper(servers: list[Any], inferences: list[FakeInference]) -> None:
    """Start the second process once the first holds the batch (it sends its requests): the tests
    mean the first to run the batch's job and the second to help with shards."""
    await until(lambda: inferences[0].calls)
    servers[1].start()


def slow(seconds: float) -> Any:
    async def wait(_: dict[str, Any]) -> None:
        await asyncio.sleep(seconds)

    return wait


async def test_one_batch_runs_on_both_processes_and_every_request_once(
    two_processes: TwoProcesses, files: FakeFiles
) -> None:
    # Leases of 3 s: under a loaded CI machine a renewal came later than a 1 s lease allows, and the
    # shard taken over ran its requests in flight again (as it must; but this test counts sends).
    servers, inferences = await two_processes(requests_per_shard=10, lease_seconds=3.0)
    for inference in inferences:
        inference.behaviour = slow(0.05)  # 200 requests, 4 at a time: 2.5 s on one process
    batch = await start_distinct(servers[0], files, 200)
    await start_helper(servers, inferences)
    final = await wait_for_status(servers[0], batch.id, "completed", seconds=30)
    assert final.status == "completed"
    assert (final.request_counts.completed, final.request_counts.failed, final.request_counts.total) == (200, 0, 200)
    assert final.usage.input_tokens == 200 * 3
    lines = read_lines(files, final.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(200)]  # once each, in input order
    sent = Counter(str(call["messages"]) for inference in inferences for call in inference.calls)
    assert len(sent) == 200 and max(sent.values()) == 1
    assert all(len(inference.calls) >= 10 for inference in inferences)  # both ran shards
    # The file was read twice, whatever the shards: to validate it, and by the helper for its first shard.
    assert len(inferences[1].calls) >= 20 and len(files.readers) == 2


async def test_a_cancel_reaches_the_shards_another_process_runs(two_processes: TwoProcesses, files: FakeFiles) -> None:
    servers, inferences = await two_processes(requests_per_shard=10, cancel_grace_seconds=0.2)
    for inference in inferences:
        inference.behaviour = slow(0.05)
    batch = await start_distinct(servers[0], files, 400)
    await start_helper(servers, inferences)
    await until(lambda: inferences[1].calls)  # the other process helps
    await servers[1].cancel_batch(batch.id)  # through the other process, as through any replica
    cancelled = await wait_for_status(servers[0], batch.id, "cancelled", seconds=5)
    assert cancelled.status == "cancelled"
    sent_after = [len(inference.calls) for inference in inferences]
    await asyncio.sleep(0.5)
    assert [len(inference.calls) for inference in inferences] == sent_after  # nobody sends any more
    done = cancelled.request_counts.completed
    assert done < 400 and len(read_lines(files, cancelled.output_file_id)) == done


async def test_a_shard_whose_process_stops_renewing_is_taken_over_and_the_batch_completes_once(
    monkeypatch: Any, two_processes: TwoProcesses, files: FakeFiles, replica_config: BatchesProviderConfig
) -> None:
    # monkeypatch comes first, so that its patches are undone only after the servers are shut down.
    # Leases of 3 s, not the fixture's 1 s: on a loaded CI machine a SQLite renewal of the healthy
    # process took longer than what was left of a 1 s lease, and its batch moved to the frozen one.
    servers, inferences = await two_processes(requests_per_shard=20, lease_seconds=3.0)
    inferences[0].behaviour = slow(0.05)
    inferences[1].stall_after(3)  # the helper's requests hang from the fourth on, as in a frozen process
    batch = await start_distinct(servers[0], files, 200)
    await start_helper(servers, inferences)
    await until(lambda: len(inferences[1].calls) >= 5)  # 3 answered, the others hang

    async def unreachable(*_: Any, **__: Any) -> None:
        raise ConnectionError("this process is cut off")

    # As a process that died: its lease (1 s here) runs out, and it claims nothing more.
    monkeypatch.setattr(servers[1]._store.shards, "renew", unreachable)
    monkeypatch.setattr(servers[1]._store.shards, "claim", unreachable)
    monkeypatch.setattr(servers[1]._store, "claim", unreachable)
    final = await wait_for_status(servers[0], batch.id, "completed", seconds=15)
    assert final.status == "completed" and final.request_counts.completed == 200
    lines = read_lines(files, final.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(200)]
    sent = Counter(str(call["messages"]) for inference in inferences for call in inference.calls)
    assert len(sent) == 200
    repeated = sum(sent.values()) - 200  # those the frozen helper had in flight
    assert 0 < repeated <= replica_config.max_concurrent_requests_per_batch


async def test_a_cancelled_batch_closes_only_after_the_other_processes_stored_what_they_had_in_flight(
    two_processes: TwoProcesses, files: FakeFiles
) -> None:
    servers, inferences = await two_processes(requests_per_shard=10, cancel_grace_seconds=5)
    inferences[0].behaviour = slow(0.05)
    inferences[1].behaviour = slow(1.0)  # the helper's requests are still in flight at the cancel
    batch = await start_distinct(servers[0], files, 200)
    await start_helper(servers, inferences)
    await until(lambda: inferences[1].calls)
    await servers[0].cancel_batch(batch.id)
    cancelled = await wait_for_status(servers[0], batch.id, "cancelled", seconds=10)
    assert cancelled.status == "cancelled"
    answered = sum(len(inference.calls) for inference in inferences)  # every request sent was answered in the grace
    assert cancelled.request_counts.completed == answered
    assert len(read_lines(files, cancelled.output_file_id)) == answered
    assert await servers[0]._store.results._chunks.keys_under(f"results/{batch.id}/") == []  # nothing written late


async def test_no_shard_is_claimed_once_its_batch_is_past_its_deadline(make_replica: ProviderFactory) -> None:
    server = await make_replica()
    store = server._store
    batch = make_batch("batch_late", status="in_progress", expires_at=int(time.time()) - 1)
    await store.create(StoredBatch(batch=batch))
    await store.shards.create(batch, [(0, 5)], 1, shareable=True)
    assert await store.shards.claim("a-server", 30) is None
    assert await store.shards.claim("a-server", 30, batch_id="batch_late") is None
    await server.shutdown()


async def test_a_batch_that_gives_up_stops_its_shards_everywhere_and_leaves_nothing_stored(
    two_processes: TwoProcesses, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"requests_per_shard": 10, "max_job_attempts": 1, "cancel_grace_seconds": 5}
    servers, inferences = await two_processes(**settings)
    # Slow enough that the job's process is still running shards when its progress writes start to
    # fail (at 50 ms, a fast run had finished its part before the patch and the batch completed).
    inferences[0].behaviour = slow(0.2)
    inferences[1].behaviour = slow(0.2)
    batch = await start_distinct(servers[0], files, 300)
    await start_helper(servers, inferences)
    await until(lambda: len(inferences[1].calls) >= 5)  # the other process helps with shards of its own

    async def refused(*_: Any, **__: Any) -> bool:
        raise ValueError("record refused")  # a failure of the batch's own making, on its job's process

    monkeypatch.setattr(servers[0]._store.shards, "save_progress", refused)
    failed = await wait_for_status(servers[1], batch.id, "failed", seconds=20)
    assert failed.status == "failed" and failed.errors.data[0].code == "batch_processing_failed"
    sent_at_end = sum(len(inference.calls) for inference in inferences)
    await asyncio.sleep(1.5)  # more than a heartbeat: a shard still running elsewhere would send more
    assert sum(len(inference.calls) for inference in inferences) == sent_at_end
    assert sent_at_end < 300  # it stopped early, on both processes
    assert await servers[0]._store.results._chunks.keys_under(f"results/{batch.id}/") == []
    assert not await servers[0]._store.shards.exist(batch.id)


async def test_a_batch_being_closed_takes_every_shard_lease_back_so_that_nothing_is_stored_late(
    make_replica: ProviderFactory,
) -> None:
    server = await make_replica()
    store = server._store
    batch = make_batch("batch_fenced", status="in_progress")
    await store.create(StoredBatch(batch=batch))
    await store.shards.create(batch, [(0, 5), (5, 10)], 1, shareable=True)
    lease = await store.shards.claim("a-server", 30, batch_id="batch_fenced")
    assert lease is not None
    await store.shards.revoke("batch_fenced")  # as finalization does, even of a lease that ran out unnoticed
    key = f"results/batch_fenced/s{lease.shard}/e{lease.epoch}/0"
    assert not await store.results._chunks.set_while_held(key, "[]", "batch_fenced", lease.shard, lease.token)
    assert await store.shards.renew(lease, 30) is None
    assert await store.results._chunks.keys_under("results/batch_fenced/") == []
    await server.shutdown()
