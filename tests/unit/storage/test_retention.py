import pytest
from openai.types.batch_request_counts import BatchRequestCounts
from sqlalchemy import func, select

from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.ownership import Owner, scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.domain.results import ResultEntry
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


async def end(store: SQLBatchStore, batch_id: str) -> None:
    def to(status: str):  # type: ignore[no-untyped-def]
        return lambda s: s.model_copy(update={"batch": transition(s.batch, status, 1)})

    await store.update_record(batch_id, to("finalizing"))
    await store.update_record(batch_id, to("completed"))


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
    await end(store, "batch_done")
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
