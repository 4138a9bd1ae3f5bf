import pytest
from openai.types.batch_request_counts import BatchRequestCounts
from sqlalchemy import delete, func, select

from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.ownership import Owner, scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.domain.results import ResultEntry
from llama_stack_provider_batches.storage.retention import ended_at
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.unit.helpers import make_batch

ALICE = Owner(principal="alice", attributes={"teams": ["a"]})


async def running(store: SQLBatchStore, batch_id: str) -> None:
    counts = BatchRequestCounts(total=2, completed=0, failed=0)
    batch = make_batch(batch_id, status="in_progress", request_counts=counts)
    await store.create(StoredBatch(batch=batch, owner=ALICE, idempotency_key=f"key-{batch_id}"))
    await store.shards.create(batch, [(0, 2)], 1, shareable=True)
    await store.request_ids.save(batch_id, ["a", "b"])
    lease = await store.shards.claim("here", 30, batch_id=batch_id)
    assert lease is not None
    await store.results.save(batch_id, 0, lease.epoch, 0, [ResultEntry(0, True, "{}")], token=lease.token)


async def end(store: SQLBatchStore, batch_id: str, status: str = "completed", **fields: object) -> None:
    """End a running batch; with no `output_file_id` in `fields`, as one that could write no result file."""

    def to(status: str, **fields: object):  # type: ignore[no-untyped-def]
        return lambda s: s.model_copy(update={"batch": transition(s.batch, status, 1, **fields)})

    await store.update_record(batch_id, to("finalizing"))
    await store.update_record(batch_id, to(status, **fields))


async def rows(store: SQLBatchStore) -> dict[str, int]:
    counted = {}
    for name in ("batches", "shards", "chunks", "ended"):
        table = getattr(store._db, name)
        [(count,)] = await store._db.read(select(func.count()).select_from(table))
        counted[name] = int(count)
    return counted


async def test_a_batch_that_ended_before_the_cutoff_goes_whole_and_one_after_it_stays(store: SQLBatchStore) -> None:
    await running(store, "batch_old")
    await end(store, "batch_old")  # left its shard and chunks behind, as a crash mid-close would
    assert await store.find_by_key(scope_of(ALICE), "key-batch_old") is not None
    removed = await store.retention.remove_ended_before(cutoff=2**40, limit=10)
    assert removed.rows >= 5 and removed.bytes > 0
    assert await store.get("batch_old") is None
    assert await rows(store) == {"batches": 0, "shards": 0, "chunks": 0, "ended": 0}
    assert await store.find_by_key(scope_of(ALICE), "key-batch_old") is None  # its idempotency key goes with it
    await running(store, "batch_new")
    await end(store, "batch_new")
    assert (await store.retention.remove_ended_before(cutoff=0, limit=10)).rows == 0
    assert await store.get("batch_new") is not None


async def test_leftovers_of_ended_batches_go_and_running_batches_keep_theirs(store: SQLBatchStore) -> None:
    await running(store, "batch_run")
    await running(store, "batch_done")
    await end(store, "batch_done", output_file_id="file-out")
    removed = await store.retention.remove_leftovers(limit=10)
    assert removed.rows == 3  # batch_done's shard row, result chunk and custom_id chunk
    assert await store.get("batch_done") is not None  # the record stays for its retention
    assert [c async for c in store.results.read("batch_run")] and await store.request_ids.load("batch_run")


async def test_files_come_due_at_their_expiry_once(store: SQLBatchStore) -> None:
    await store.retention.expire_file_at("file-1", "batch_1", ALICE, 100.0)
    await store.retention.expire_file_at("file-1", "batch_1", ALICE, 100.0)  # a repeated close
    await store.retention.expire_file_at("file-2", "batch_1", None, 200.0)
    assert [f.file_id for f in await store.retention.files_due(150.0, 10)] == ["file-1"]
    [due] = await store.retention.files_due(150.0, 10)
    assert due.owner == ALICE
    await store.retention.file_expired("file-1")
    assert [f.file_id for f in await store.retention.files_due(300.0, 10)] == ["file-2"]


@pytest.mark.parametrize("limit", [1, 3])
async def test_removal_works_in_bounded_steps(store: SQLBatchStore, limit: int) -> None:
    for n in range(4):
        await running(store, f"batch_{n}")
        await end(store, f"batch_{n}")
    steps = 0
    while (await store.retention.remove_ended_before(2**40, limit)).rows:
        steps += 1
    assert steps == -(-4 // limit) and (await rows(store))["batches"] == 0


async def test_the_results_of_a_batch_that_ended_without_files_stay_until_its_retention(store: SQLBatchStore) -> None:
    await running(store, "batch_kept")
    await end(store, "batch_kept", "failed")  # gave up: no file could be written (job.py)
    removed = await store.retention.remove_leftovers(limit=10)
    assert removed.rows == 2  # its shard row and custom_id chunk: its results are their only copy
    assert [chunk async for chunk in store.results.read("batch_kept")]
    assert (await store.retention.remove_leftovers(limit=10)).rows == 0  # not looked at again
    await store.retention.remove_ended_before(cutoff=2**40, limit=10)
    assert await rows(store) == {"batches": 0, "shards": 0, "chunks": 0, "ended": 0}


async def test_batches_that_ended_without_an_ended_time_get_theirs_from_their_record(store: SQLBatchStore) -> None:
    await running(store, "batch_run")
    for batch_id, stamp in (("batch_old", 1000), ("batch_new", 2000)):
        await running(store, batch_id)
        await end(store, batch_id, completed_at=stamp)
    await store._db.write(delete(store._db.ended))  # as an earlier release or a kvstore upgrade left them
    assert await store.retention.record_missing_ends(now=5000.0, limit=1) == 1  # in bounded steps
    assert await store.retention.record_missing_ends(now=5000.0, limit=10) == 1
    assert await store.retention.record_missing_ends(now=5000.0, limit=10) == 0  # once: idempotent
    ended = await store._db.read(select(store._db.ended.c.batch_id, store._db.ended.c.ended_at))
    assert sorted((row.batch_id, row.ended_at) for row in ended) == [("batch_new", 2000.0), ("batch_old", 1000.0)]
    await store.retention.remove_ended_before(cutoff=1500.0, limit=10)
    assert await store.get("batch_old") is None and await store.get("batch_new") is not None


def test_a_record_without_its_end_stamped_ends_now() -> None:
    batch = make_batch("batch_x", status="cancelled")
    assert ended_at(StoredBatch(batch=batch).model_dump_json(), now=42.0) == 42.0
    stamped = batch.model_copy(update={"cancelled_at": 7})
    assert ended_at(StoredBatch(batch=stamped).model_dump_json(), now=42.0) == 7.0
