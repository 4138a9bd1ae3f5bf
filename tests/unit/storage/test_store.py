"""What the store does, on each SQL backend that runs here (SQLite and PostgreSQL)."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.ownership import Owner, scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.domain.results import ResultEntry, decode_results, encode_results
from llama_stack_provider_batches.stack import BatchNotFoundError, BatchObject
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from llama_stack_provider_batches.storage.store import BatchStore
from tests.unit.backends import SQL_BACKENDS, open_kvstore, sql_reference
from tests.unit.helpers import make_batch


@pytest.fixture(params=SQL_BACKENDS)
async def store(request, tmp_path: Path) -> AsyncIterator[BatchStore]:
    async with open_kvstore("sqlite", tmp_path) as (kvstore, namespace), sql_reference(request.param, tmp_path) as ref:
        connector = SQLBatchStore(ref, kvstore, namespace)
        await connector.initialize()
        yield connector
        await connector.close()


def owned_by(principal: str) -> Owner:
    return Owner(principal=principal, attributes={"teams": [principal]})


async def create(store: BatchStore, batch_id: str, key: str | None = None, owner: Owner | None = None) -> StoredBatch:
    stored, _ = await store.create(StoredBatch(batch=make_batch(batch_id), idempotency_key=key, owner=owner))
    return stored


async def test_a_created_batch_reads_back(store: BatchStore) -> None:
    await create(store, "batch_a", key="k")
    await store.update("batch_a", lambda b: b.model_copy(update={"metadata": {"k": "v"}}))
    stored = await store.get("batch_a")
    assert stored is not None
    assert stored.batch == make_batch("batch_a", metadata={"k": "v"})
    assert stored.idempotency_key == "k"
    assert await store.get("batch_missing") is None
    with pytest.raises(BatchNotFoundError):
        await store.get_batch("batch_missing")


async def test_concurrent_creates_with_one_key_store_one_batch(store: BatchStore) -> None:
    results = await asyncio.gather(*(create(store, f"batch_{n}", key="same") for n in range(20)))
    assert len({stored.batch.id for stored in results}) == 1
    page = await store.page("_", None, 100)
    assert page is not None and [s.batch.id for s in page.batches] == [results[0].batch.id]


async def test_idempotency_keys_are_scoped_by_owner(store: BatchStore) -> None:
    alice = await create(store, "batch_alice", key="k", owner=owned_by("alice"))
    bob = await create(store, "batch_bob", key="k", owner=owned_by("bob"))
    assert (alice.batch.id, bob.batch.id) == ("batch_alice", "batch_bob")


async def test_concurrent_updates_do_not_lose_each_other(store: BatchStore) -> None:
    await create(store, "batch_u")

    def bump(batch: BatchObject) -> BatchObject:
        return batch.model_copy(update={"created_at": batch.created_at + 1})

    await asyncio.gather(*(store.update("batch_u", bump) for _ in range(30)))
    assert (await store.get_batch("batch_u")).created_at == 31


async def test_an_update_that_raises_writes_nothing(store: BatchStore) -> None:
    await create(store, "batch_c")
    await store.update("batch_c", lambda b: transition(b, "failed", now=2))
    with pytest.raises(Exception, match="cannot move"):
        await store.update("batch_c", lambda b: transition(b, "in_progress", now=9))
    assert (await store.get_batch("batch_c")).status == "failed"
    with pytest.raises(BatchNotFoundError):
        await store.update("batch_missing", lambda b: b)


async def test_pages_walk_a_scope_newest_first(store: BatchStore) -> None:
    ids = [f"batch_{n:03d}" for n in range(25)]
    for batch_id in ids:
        await create(store, batch_id, owner=owned_by("alice"))
    await create(store, "batch_other", owner=owned_by("bob"))
    walked: list[str] = []
    after = None
    while True:
        page = await store.page(scope_of(owned_by("alice")), after, 10)
        assert page is not None
        walked.extend(s.batch.id for s in page.batches)
        if not page.has_more:
            break
        after = walked[-1]
    assert walked == list(reversed(ids))
    alice = scope_of(owned_by("alice"))
    assert await store.page(alice, "batch_other", 10) is None  # bob's batch is no cursor for alice
    assert await store.page(alice, "batch_missing", 10) is None


async def test_claims_take_unfinished_batches_oldest_first_and_once(store: BatchStore) -> None:
    for batch_id in ("batch_1", "batch_2", "batch_3"):
        await create(store, batch_id)
    await store.update("batch_2", lambda b: transition(b, "failed", now=2))
    first = await store.claim("server-a", 1, lease_seconds=30)
    assert [lease.batch_id for lease in first] == ["batch_1"]
    rest = await store.claim("server-a", 10, lease_seconds=30)
    assert [lease.batch_id for lease in rest] == ["batch_3"]  # batch_1 is held, batch_2 finished
    assert await store.claim("server-a", 10, lease_seconds=30) == []
    assert await store.renew(first[0], lease_seconds=30) == "validating"
    await store.release(first[0])
    assert await store.renew(first[0], lease_seconds=30) is None
    again = await store.claim("server-a", 10, lease_seconds=30)
    assert [lease.batch_id for lease in again] == ["batch_1"]


async def test_a_batch_created_claimed_is_not_claimed_again(store: BatchStore) -> None:
    await create(store, "batch_1")
    _, lease = await store.create(StoredBatch(batch=make_batch("batch_2")), "server-a", lease_seconds=30)
    assert lease is not None and lease.batch_id == "batch_2"
    assert [lease.batch_id for lease in await store.claim("server-b", 10, lease_seconds=30)] == ["batch_1"]
    assert await store.renew(lease, lease_seconds=30) == "validating"
    await store.create(StoredBatch(batch=make_batch("batch_3"), idempotency_key="k"), "server-a", 30)
    replay, replay_lease = await store.create(StoredBatch(batch=make_batch("batch_4"), idempotency_key="k"), "s", 30)
    assert (replay.batch.id, replay_lease) == ("batch_3", None)  # a replay claims nothing


async def test_concurrent_claims_never_share_a_batch(store: BatchStore) -> None:
    for n in range(10):
        await create(store, f"batch_{n}")
    claims = await asyncio.gather(*(store.claim(f"server-{n}", 3, lease_seconds=30) for n in range(5)))
    claimed = [lease.batch_id for leases in claims for lease in leases]
    assert sorted(claimed) == sorted(f"batch_{n}" for n in range(10))


async def test_result_chunks_come_back_earlier_releases_first_then_by_shard_and_epoch(store: BatchStore) -> None:
    chunks, entry = store.results, lambda n: [ResultEntry(n, True, "{}")]
    await chunks.save("batch_r", 1, 1, 0, entry(10))
    await chunks.save("batch_r", 0, 2, 0, entry(3))  # shard 0's epoch 1 died before writing anything
    await chunks.save("batch_r", 0, 1, 0, entry(1))
    await chunks.save("batch_r", 0, 1, 10, entry(2))  # numbers sort as numbers, not text
    await chunks.save("batch_r", 0, 1, 2, entry(1))
    await store.results._chunks.set("results/batch_r/e1/0", encode_results(entry(0)))  # an earlier release's
    await chunks.save("batch_other", 0, 1, 0, entry(99))
    read = [decode_results(c)[0].position async for c in chunks.read("batch_r")]
    assert read == [0, 1, 1, 2, 3, 10]
    assert [decode_results(c)[0].position async for c in chunks.read("batch_r", shard=1)] == [0, 10]
    assert await chunks.count("batch_r", 0, 1) == 3
    await chunks.delete("batch_r")
    assert [c async for c in chunks.read("batch_r")] == []
    assert [decode_results(c)[0].position async for c in chunks.read("batch_other")] == [99]
