"""The storage layout, against every kvstore backend that runs here (SQLite always; PostgreSQL and
Redis on 127.0.0.1 when their servers are up)."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llama_stack.core.storage.datatypes import (
    KVStoreReference,
    PostgresKVStoreConfig,
    RedisKVStoreConfig,
    SqliteKVStoreConfig,
)
from llama_stack.core.storage.kvstore import kvstore_impl, register_kvstore_backends
from llama_stack_api import BatchNotFoundError, BatchObject

from llama_stack_provider_batches.lifecycle import transition
from llama_stack_provider_batches.store import PAGE_SIZE, BatchStore, KeyedLocks, StoredBatch
from tests.unit.helpers import make_batch
from tools.harness import server_up

BACKENDS = {
    "sqlite": None,
    "postgres": PostgresKVStoreConfig(host="127.0.0.1", port=5432, db="test", user="postgres", table_name="kv_unit"),
    "redis": RedisKVStoreConfig(host="127.0.0.1", port=6379),
}
PORTS = {"postgres": 5432, "redis": 6379}


class CountingKV:
    """A kvstore wrapper that counts reads, to show what a list call costs."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gets = 0

    async def get(self, key: str):
        self.gets += 1
        return await self.inner.get(key)

    async def set(self, key: str, value: str, expiration=None) -> None:
        await self.inner.set(key, value)


@pytest.fixture(params=list(BACKENDS))
async def kv_store(request, tmp_path: Path) -> AsyncIterator[BatchStore]:
    name = request.param
    if name in PORTS and not server_up(PORTS[name]):
        pytest.skip(f"no {name} server on 127.0.0.1:{PORTS[name]}")
    config = BACKENDS[name] or SqliteKVStoreConfig(db_path=str(tmp_path / "kv.db"))
    register_kvstore_backends({"kv_store_test": config})
    # A fresh namespace per test keeps the shared servers' earlier data out of the way.
    namespace = f"t{uuid.uuid4().hex[:12]}"
    kvstore = await kvstore_impl(KVStoreReference(backend="kv_store_test", namespace=namespace))
    yield BatchStore(kvstore, namespace)
    await kvstore.shutdown()


async def add(store: BatchStore, batch_id: str, scope: str = "_") -> None:
    position = await store.append_to_index(scope, batch_id)
    await store.put(StoredBatch(batch=make_batch(batch_id), index_position=position))


async def test_put_get_round_trip(kv_store: BatchStore) -> None:
    await kv_store.put(StoredBatch(batch=make_batch("batch_a", metadata={"k": "v"}), idempotency_key="k"))
    stored = await kv_store.get("batch_a")
    assert stored is not None
    assert stored.batch == make_batch("batch_a", metadata={"k": "v"})
    assert stored.idempotency_key == "k"
    assert await kv_store.get("batch_missing") is None
    with pytest.raises(BatchNotFoundError):
        await kv_store.get_batch("batch_missing")


async def test_concurrent_updates_do_not_lose_each_other(kv_store: BatchStore) -> None:
    await kv_store.put(StoredBatch(batch=make_batch("batch_u", status="in_progress")))

    def bump(batch: BatchObject) -> BatchObject:
        return batch.model_copy(update={"created_at": batch.created_at + 1})

    await asyncio.gather(*(kv_store.update("batch_u", bump) for _ in range(30)))
    assert (await kv_store.get_batch("batch_u")).created_at == 31


async def test_update_that_raises_writes_nothing(kv_store: BatchStore) -> None:
    await kv_store.put(StoredBatch(batch=make_batch("batch_c", status="completed")))
    with pytest.raises(Exception, match="cannot move"):
        await kv_store.update("batch_c", lambda b: transition(b, "in_progress", now=9))
    assert (await kv_store.get_batch("batch_c")).status == "completed"


async def test_index_pages_newest_first_across_page_boundaries(kv_store: BatchStore) -> None:
    ids = [f"batch_{n:04d}" for n in range(PAGE_SIZE * 2 + 7)]
    for batch_id in ids:
        await add(kv_store, batch_id)
    newest_first = list(reversed(ids))
    assert await kv_store.newest_ids("_", None, 5) == newest_first[:5]
    assert await kv_store.newest_ids("_", None, 1000) == newest_first
    # Walking with a cursor visits every id once, in order.
    walked: list[str] = []
    before = None
    while chunk := await kv_store.newest_ids("_", before, 30):
        walked.extend(chunk)
        before = (await kv_store.get(chunk[-1])).index_position
    assert walked == newest_first


async def test_concurrent_appends_keep_every_id(kv_store: BatchStore) -> None:
    ids = [f"batch_c{n}" for n in range(PAGE_SIZE + 20)]
    positions = await asyncio.gather(*(kv_store.append_to_index("_", batch_id) for batch_id in ids))
    assert len({(p.page, p.slot) for p in positions}) == len(ids)
    assert sorted(await kv_store.newest_ids("_", None, 1000)) == sorted(ids)


async def test_scopes_have_separate_indexes(kv_store: BatchStore) -> None:
    await add(kv_store, "batch_x", scope="alice")
    await add(kv_store, "batch_y", scope="bob")
    assert await kv_store.newest_ids("alice", None, 10) == ["batch_x"]
    assert await kv_store.newest_ids("bob", None, 10) == ["batch_y"]


async def test_idempotency_keys_are_scoped(kv_store: BatchStore) -> None:
    await kv_store.remember_key("alice", "key-1", "batch_a")
    assert await kv_store.batch_id_for_key("alice", "key-1") == "batch_a"
    assert await kv_store.batch_id_for_key("bob", "key-1") is None


async def test_a_page_costs_reads_in_proportion_to_its_size(tmp_path: Path) -> None:
    register_kvstore_backends({"kv_count": SqliteKVStoreConfig(db_path=str(tmp_path / "count.db"))})
    kvstore = await kvstore_impl(KVStoreReference(backend="kv_count", namespace="n"))
    counting = CountingKV(kvstore)
    store = BatchStore(counting, "n")  # type: ignore[arg-type]
    for n in range(1000):
        await store.append_to_index("_", f"batch_{n:05d}")
    counting.gets = 0
    assert len(await store.newest_ids("_", None, 21)) == 21
    assert counting.gets <= 3  # the head and at most two pages, out of ten
    await kvstore.shutdown()


async def test_keyed_locks_serialise_one_key_and_clean_up() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with locks.hold("k"):
            order.append(f"{name}-in")
            await asyncio.sleep(0.01)
            order.append(f"{name}-out")

    await asyncio.gather(hold("a"), hold("b"))
    assert order == ["a-in", "a-out", "b-in", "b-out"]
    assert locks._locks == {}


async def test_result_chunks_come_back_in_order_until_the_first_gap(kv_store: BatchStore) -> None:
    from llama_stack_provider_batches.results import ResultEntry, decode_results

    first, second = [ResultEntry(0, True, "{}")], [ResultEntry(1, False, '{"e":1}')]
    await kv_store.save_result_chunk("batch_r", 0, first)
    await kv_store.save_result_chunk("batch_r", 1, second)
    chunks = [chunk async for chunk in kv_store.result_chunks("batch_r")]
    assert [decode_results(chunk) for chunk in chunks] == [first, second]
    await kv_store.delete_results("batch_r", 2)
    assert [chunk async for chunk in kv_store.result_chunks("batch_r")] == []


async def test_the_active_list_keeps_creation_order(kv_store: BatchStore) -> None:
    for batch_id in ("batch_1", "batch_2", "batch_3"):
        await kv_store.add_active(batch_id)
    await kv_store.add_active("batch_2")
    await kv_store.remove_active("batch_1")
    await kv_store.remove_active("batch_unknown")
    assert await kv_store.active_ids() == ["batch_2", "batch_3"]


async def test_the_layout_version_is_written_once_and_checked(kv_store: BatchStore) -> None:
    await kv_store.check_layout()
    await kv_store.check_layout()
    await kv_store._kv.set(kv_store._prefix + "layout", '{"version": 2}')
    with pytest.raises(RuntimeError, match="layout"):
        await kv_store.check_layout()
