"""The replicas connector with two servers' connectors on one table (SQLite and PostgreSQL): what
one replica does, the other sees, and a lease taken over fences its old holder off."""

import asyncio

import pytest
from sqlalchemy import update

from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.ownership import Owner
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from llama_stack_provider_batches.storage.store import LeaseLostError
from tests.unit.helpers import make_batch

Replicas = tuple[SQLBatchStore, SQLBatchStore]


async def create(store: SQLBatchStore, stored: StoredBatch) -> StoredBatch:
    return (await store.create(stored))[0]


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
    [old] = await first.claim("server-a", 1, lease_seconds=30)
    assert await second.claim("server-b", 1, lease_seconds=30) == []  # held
    # The holder died and stopped renewing: its lease ran out (set in the past, not waited for, so
    # that a loaded machine cannot let it run out before the check above).
    batches = first._db.batches
    await first._db.write(update(batches).where(batches.c.id == "batch_t").values(lease_expires_at=0.0))
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


async def test_claims_take_owners_in_turn_those_running_least_first(replicas: Replicas) -> None:
    first, second = replicas
    alice, bob, carol = (Owner(principal=name) for name in ("alice", "bob", "carol"))
    for n in range(4):
        await create(first, StoredBatch(batch=make_batch(f"batch_a{n}"), owner=alice))
    [running] = await first.claim("server-a", 1, lease_seconds=30)
    assert running.batch_id == "batch_a0"  # alone: the oldest
    await create(first, StoredBatch(batch=make_batch("batch_b0"), owner=bob))
    await create(first, StoredBatch(batch=make_batch("batch_b1"), owner=bob))
    await create(first, StoredBatch(batch=make_batch("batch_c0"), owner=carol))
    # Alice runs one batch already (on the other replica): bob's and carol's first batches go first,
    # then owners take turns, the oldest batch first among equal turns.
    claimed = await second.claim("server-b", 6, lease_seconds=30)
    assert [lease.batch_id for lease in claimed] == [
        "batch_b0",
        "batch_c0",
        "batch_a1",
        "batch_b1",
        "batch_a2",
        "batch_a3",
    ]
