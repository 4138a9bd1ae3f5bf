import asyncio
import errno

import pytest
from openai.types.batch_request_counts import BatchRequestCounts

from llama_stack_provider_batches.domain.outages import DependencyGate
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.domain.results import ResultEntry, decode_results
from llama_stack_provider_batches.engine.result_log import ResultLog, Unstored
from llama_stack_provider_batches.storage.shards import ShardLease
from llama_stack_provider_batches.storage.store import BatchStore, LeaseLostError
from tests.unit.helpers import make_batch


async def stored_entries(store: BatchStore, batch_id: str) -> list[ResultEntry]:
    return [entry async for chunk in store.results.read(batch_id) for entry in decode_results(chunk)]


async def running(store: BatchStore, batch_id: str, total: int = 10) -> ShardLease:
    """A new in-progress batch of one shard, and this server's lease on that shard."""
    counts = BatchRequestCounts(total=total, completed=0, failed=0)
    batch = make_batch(batch_id, status="in_progress", request_counts=counts)
    await store.create(StoredBatch(batch=batch))
    await store.shards.create(batch, [(0, total)], 1, shareable=True)
    lease = await store.shards.claim("this-server", 30, batch_id=batch_id)
    assert lease is not None
    return lease


async def test_results_are_stored_soon_after_they_are_added(store: BatchStore) -> None:
    log = ResultLog(store, await running(store, "batch_l"))
    writer = asyncio.create_task(log.write_continuously())
    log.add_success(ResultEntry(0, True, "{}"), 3, 4)
    for _ in range(100):
        if log.chunks:
            break
        await asyncio.sleep(0.01)
    assert [entry.position for entry in await stored_entries(store, "batch_l")] == [0]
    log.add_failure(ResultEntry(2, False, "{}"))
    await asyncio.sleep(0.2)
    writer.cancel()
    assert [entry.position for entry in await stored_entries(store, "batch_l")] == [0, 2]
    assert (log.tally.completed, log.tally.failed, log.tally.input_tokens) == (1, 1, 3)


async def test_counts_cover_only_stored_results(store: BatchStore) -> None:
    log = ResultLog(store, await running(store, "batch_c"))
    log.add_success(ResultEntry(0, True, "{}"), 1, 1)
    assert (await store.get_batch("batch_c")).request_counts.completed == 0
    await log.flush()
    await log.report_progress()
    batch = await store.get_batch("batch_c")
    assert (batch.request_counts.total, batch.request_counts.completed) == (10, 1)
    assert batch.usage.total_tokens == 2


async def test_a_resumed_log_numbers_new_chunks_after_the_stored_ones(store: BatchStore) -> None:
    lease = await running(store, "batch_r")
    first = ResultLog(store, lease)
    first.add_success(ResultEntry(0, True, "{}"), 0, 0)
    await first.flush()
    second = ResultLog(store, lease, stored_chunks=first.chunks)
    second.add_success(ResultEntry(1, True, "{}"), 0, 0)
    await second.flush()
    assert [entry.position for entry in await stored_entries(store, "batch_r")] == [0, 1]


async def test_cancelling_the_writer_mid_write_loses_nothing(store: BatchStore) -> None:
    log = ResultLog(store, await running(store, "batch_x", total=50))
    writer = asyncio.create_task(log.write_continuously())
    for position in range(50):
        log.add_success(ResultEntry(position, True, "{}"), 0, 0)
        if position % 7 == 0:
            await asyncio.sleep(0)
            writer.cancel()
            writer = asyncio.create_task(log.write_continuously())
    writer.cancel()
    await log.flush()
    assert sorted(entry.position for entry in await stored_entries(store, "batch_x")) == list(range(50))


async def test_progress_is_reported_within_the_interval_even_when_results_stop_coming(store: BatchStore) -> None:
    log = ResultLog(store, await running(store, "batch_p"))
    writer = asyncio.create_task(log.write_continuously())
    log.add_success(ResultEntry(0, True, "{}"), 0, 0)
    await asyncio.sleep(0.1)
    log.add_success(ResultEntry(1, True, "{}"), 0, 0)  # stored at once, reported at most 0.5 s later
    await asyncio.sleep(0.8)
    writer.cancel()
    assert (await store.get_batch("batch_p")).request_counts.completed == 2


def first_save_fails(store: BatchStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """Make the store's first chunk write fail as an outage does (written or not, no answer); return
    the writes tried, as (chunk number, positions)."""
    real_save = store.results.save
    saves: list[tuple[int, list[int]]] = []

    async def down_once(
        batch_id: str, shard: int, epoch: int, chunk: int, entries: list[ResultEntry], token: str
    ) -> None:
        saves.append((chunk, [entry.position for entry in entries]))
        if len(saves) == 1:
            raise OSError(errno.EIO, "Input/output error")
        await real_save(batch_id, shard, epoch, chunk, entries, token=token)

    monkeypatch.setattr(store.results, "save", down_once)
    return saves


async def test_a_chunk_the_store_could_not_take_is_written_again_as_it_was(
    store: BatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = DependencyGate(initial_pause=0.05)
    log = ResultLog(store, await running(store, "batch_o"), gate=gate)
    saves = first_save_fails(store, monkeypatch)
    writer = asyncio.create_task(log.write_continuously())
    log.add_success(ResultEntry(0, True, "{}"), 1, 1)
    await asyncio.sleep(0.02)
    assert not gate.is_open  # nothing new is sent while results cannot be stored
    log.add_success(ResultEntry(1, True, "{}"), 1, 1)
    for _ in range(100):
        if log.chunks == 2:
            break
        await asyncio.sleep(0.01)
    writer.cancel()
    # The same chunk number holds the same results; what came meanwhile goes in the next one.
    assert saves == [(0, [0]), (0, [0]), (1, [1])]
    assert [entry.position for entry in await stored_entries(store, "batch_o")] == [0, 1]
    assert gate.is_open and log.tally.completed == 2


async def test_a_flush_after_a_failed_write_stores_that_chunk_and_everything_added_since(
    store: BatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ResultLog(store, await running(store, "batch_f"))
    saves = first_save_fails(store, monkeypatch)
    log.add_success(ResultEntry(0, True, "{}"), 1, 1)
    with pytest.raises(OSError):
        await log.flush()
    log.add_success(ResultEntry(1, True, "{}"), 1, 1)
    log.add_failure(ResultEntry(2, False, "{}"))
    await log.flush()  # the last flush of a shard run: nothing may stay behind in memory
    assert saves == [(0, [0]), (0, [0]), (1, [1, 2])]
    assert [entry.position for entry in await stored_entries(store, "batch_f")] == [0, 1, 2]
    assert log.tally.completed == 2 and log.tally.failed == 1


async def test_a_store_error_that_is_no_outage_ends_the_writer(
    store: BatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ResultLog(store, await running(store, "batch_e"))

    async def refuse(*_: object, **__: object) -> None:
        raise ValueError("record refused")

    monkeypatch.setattr(store.results, "save", refuse)
    writer = asyncio.create_task(log.write_continuously())
    log.add_success(ResultEntry(0, True, "{}"), 1, 1)
    with pytest.raises(ValueError, match="record refused"):
        await asyncio.wait_for(writer, 1)


async def test_results_are_written_only_while_the_shards_lease_holds(store: BatchStore) -> None:
    lease = await running(store, "batch_h")
    log = ResultLog(store, lease)
    log.add_success(ResultEntry(0, True, "{}"), 1, 1)
    await log.flush()
    await store.shards.delete("batch_h")  # the batch ended and was cleaned up meanwhile
    log.add_success(ResultEntry(1, True, "{}"), 1, 1)
    with pytest.raises(LeaseLostError):
        await log.flush()
    assert [entry.position for entry in await stored_entries(store, "batch_h")] == [0]  # nothing written late


async def test_a_store_that_does_not_answer_stops_new_requests_once_max_at_risk_results_wait(
    store: BatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ResultLog(store, await running(store, "batch_h", total=20), max_at_risk=4)
    answers = asyncio.Event()  # a partition: the write neither fails nor returns until it heals
    real_save = store.results.save

    async def hangs(batch_id: str, shard: int, epoch: int, chunk: int, entries: list[ResultEntry], token: str) -> None:
        await answers.wait()
        await real_save(batch_id, shard, epoch, chunk, entries, token=token)

    monkeypatch.setattr(store.results, "save", hangs)
    writer = asyncio.create_task(log.write_continuously())
    added = 0

    async def send_while_there_is_room() -> None:
        nonlocal added
        while added < 20:
            await log.wait_for_room()
            log.add_success(ResultEntry(added, True, "{}"), 0, 0)
            added += 1
            await asyncio.sleep(0.005)

    sender = asyncio.create_task(send_while_there_is_room())
    await asyncio.sleep(0.3)
    assert added == 4 and log.unstored == 4 and not sender.done()
    answers.set()  # the store answers again: the waiting results are stored, and sending goes on
    await asyncio.wait_for(sender, 5)
    await log.flush()
    writer.cancel()
    assert sorted(entry.position for entry in await stored_entries(store, "batch_h")) == list(range(20))


async def test_requests_in_flight_count_towards_the_bound_with_unstored_results(
    store: BatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ResultLog(store, await running(store, "batch_r", total=20), max_at_risk=4)
    await asyncio.wait_for(log.wait_for_room(in_flight=3), 1)  # 3 at risk: room for one more
    log.add_success(ResultEntry(0, True, "{}"), 0, 0)
    waiting = asyncio.create_task(log.wait_for_room(in_flight=3))  # 3 in flight and 1 unstored: full
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await log.flush()
    await asyncio.wait_for(waiting, 1)  # the stored result made room


async def test_the_logs_of_one_batch_share_its_bound(store: BatchStore) -> None:
    lease = await running(store, "batch_s", total=20)
    shared = Unstored()  # a job's two shard runs, side by side at a shard boundary
    first, second = (ResultLog(store, lease, max_at_risk=4, unstored=shared) for _ in range(2))
    first.add_success(ResultEntry(0, True, "{}"), 0, 0)
    first.add_success(ResultEntry(1, True, "{}"), 0, 0)
    second.add_success(ResultEntry(2, True, "{}"), 0, 0)
    waiting = asyncio.create_task(second.wait_for_room(in_flight=1))  # 3 unstored + 1 in flight: full
    await asyncio.sleep(0.05)
    assert not waiting.done() and shared.count == 3
    await first.flush()  # the other log's results stored: room for this one
    await asyncio.wait_for(waiting, 1)
    assert shared.count == 1


async def test_a_log_dropped_with_unstored_results_leaves_the_batch_room(store: BatchStore) -> None:
    lease = await running(store, "batch_f", total=20)
    shared = Unstored()
    lost, next_run = (ResultLog(store, lease, max_at_risk=4, unstored=shared) for _ in range(2))
    for position in range(3):  # its shard's lease moved before these could be stored
        lost.add_success(ResultEntry(position, True, "{}"), 0, 0)
    waiting = asyncio.create_task(next_run.wait_for_room(in_flight=1))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    lost.forget()  # its run ended: those run again elsewhere, and count here no more
    await asyncio.wait_for(waiting, 1)
    assert shared.count == 0
