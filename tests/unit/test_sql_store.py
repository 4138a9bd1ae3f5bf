"""The replicas connector with two servers' connectors on one table (SQLite and PostgreSQL): what
one replica does, the other sees, and a lease taken over fences its old holder off."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llama_stack_provider_batches.kv_store import KVBatchStore
from llama_stack_provider_batches.lifecycle import transition
from llama_stack_provider_batches.sql_store import SQLBatchStore
from llama_stack_provider_batches.store import LeaseLostError, StoredBatch
from tests.unit.backends import SQL_BACKENDS, open_kvstore, sql_reference
from tests.unit.helpers import make_batch

Replicas = tuple[SQLBatchStore, SQLBatchStore]


async def create(store: SQLBatchStore, stored: StoredBatch) -> StoredBatch:
    return (await store.create(stored))[0]


@pytest.fixture(params=SQL_BACKENDS)
async def replicas(request, tmp_path: Path) -> AsyncIterator[Replicas]:
    async with open_kvstore("sqlite", tmp_path) as (kvstore, namespace), sql_reference(request.param, tmp_path) as ref:
        first, second = SQLBatchStore(ref, kvstore, namespace), SQLBatchStore(ref, kvstore, namespace)
        await first.initialize()
        await second.initialize()
        yield first, second
        await first.close()
        await second.close()


async def test_fifty_creates_with_one_key_over_two_replicas_store_one_batch(replicas: Replicas) -> None:
    def new(n: int) -> StoredBatch:
        return StoredBatch(batch=make_batch(f"batch_{n}"), idempotency_key="one-key")

    results = await asyncio.gather(*(create(replicas[n % 2], new(n)) for n in range(50)))
    assert len({stored.batch.id for stored in results}) == 1
    for store in replicas:
        page = await store.page("_", None, 100)
        assert page is not None and len(page.batches) == 1


async def test_an_expired_lease_is_taken_over_and_its_old_holder_fenced_off(replicas: Replicas) -> None:
    first, second = replicas
    await create(first, StoredBatch(batch=make_batch("batch_t")))
    [old] = await first.claim("server-a", 1, lease_seconds=0.5)
    assert await second.claim("server-b", 1, lease_seconds=30) == []  # held
    await asyncio.sleep(0.8)  # the holder stops renewing: it died
    [new] = await second.claim("server-b", 1, lease_seconds=30)
    assert (new.batch_id, new.epoch) == ("batch_t", old.epoch + 1)

    assert await first.renew(old, lease_seconds=30) is None
    with pytest.raises(LeaseLostError):
        await first.update("batch_t", lambda b: transition(b, "in_progress", now=2), old)
    await second.update("batch_t", lambda b: transition(b, "in_progress", now=3), new)
    await first.release(old)  # releasing a lease taken over changes nothing
    assert await second.renew(new, lease_seconds=30) == "in_progress"
    assert await first.claim("server-a", 1, lease_seconds=30) == []


async def test_a_cancel_through_one_replica_reaches_the_holder_at_its_next_renewal(replicas: Replicas) -> None:
    first, second = replicas
    await create(first, StoredBatch(batch=make_batch("batch_c")))
    [lease] = await first.claim("server-a", 1, lease_seconds=30)
    await first.update("batch_c", lambda b: transition(b, "in_progress", now=2), lease)
    await second.update("batch_c", lambda b: transition(b, "cancelling", now=3))  # no lease: a user's cancel
    assert await first.renew(lease, lease_seconds=30) == "cancelling"
    # The holder's next update starts from the cancel rather than overwriting it.
    counted = await first.update("batch_c", lambda b: b.model_copy(update={"metadata": {"n": "1"}}), lease)
    assert (counted.status, counted.metadata) == ("cancelling", {"n": "1"})


async def test_a_released_lease_can_be_claimed_at_once_by_another_replica(replicas: Replicas) -> None:
    first, second = replicas
    await create(first, StoredBatch(batch=make_batch("batch_r")))
    [lease] = await first.claim("server-a", 1, lease_seconds=30)
    await first.release(lease)  # a graceful stop
    [taken] = await second.claim("server-b", 1, lease_seconds=30)
    assert taken.epoch == lease.epoch + 1


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_a_single_servers_unfinished_batches_are_taken_over_and_the_others_still_found(
    backend: str, tmp_path: Path
) -> None:
    async with open_kvstore("sqlite", tmp_path) as (kvstore, namespace), sql_reference(backend, tmp_path) as ref:
        single = KVBatchStore(kvstore, namespace)  # the deployment before `sql_store` was set
        await single.create(StoredBatch(batch=make_batch("batch_done")))
        await single.update("batch_done", lambda b: transition(b, "failed", now=2))
        await single.retire("batch_done")
        await single.create(StoredBatch(batch=make_batch("batch_running"), idempotency_key="k"))
        await single.update("batch_running", lambda b: transition(b, "in_progress", now=2))

        for _ in range(2):  # two replicas start: one copies, the other finds nothing left to copy
            replica = SQLBatchStore(ref, kvstore, namespace)
            await replica.initialize()
        assert await single.active_ids() == []
        [lease] = await replica.claim("server-a", 10, lease_seconds=30)
        assert (lease.batch_id, lease.epoch) == ("batch_running", 1)  # its results so far are epoch 0's
        assert (await replica.get_batch("batch_done")).status == "failed"  # found by id
        page = await replica.page("_", None, 10)
        assert page is not None and [s.batch.id for s in page.batches] == ["batch_running"]
        replay, _ = await replica.create(StoredBatch(batch=make_batch("batch_new"), idempotency_key="k"))
        assert replay.batch.id == "batch_running"
        await replica.close()
