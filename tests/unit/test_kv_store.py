"""The single-server connector's own layout (list index pages, work queue, layout version), against
every kvstore backend that runs here (SQLite always; PostgreSQL and Redis on 127.0.0.1 when their
servers are up). What every connector does is in test_store.py."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llama_stack.core.storage.datatypes import (
    KVStoreReference,
    SqliteKVStoreConfig,
)
from llama_stack.core.storage.kvstore import kvstore_impl, register_kvstore_backends

from llama_stack_provider_batches import kv_store as kv_store_module
from llama_stack_provider_batches.kv_store import PAGE_SIZE, KeyedLocks, KVBatchStore
from llama_stack_provider_batches.store import StoredBatch
from tests.unit.backends import KV_BACKENDS, open_kvstore
from tests.unit.helpers import make_batch


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


@pytest.fixture(params=KV_BACKENDS)
async def kv_store(request, tmp_path: Path) -> AsyncIterator[KVBatchStore]:
    async with open_kvstore(request.param, tmp_path) as (kvstore, namespace):
        yield KVBatchStore(kvstore, namespace)


async def add(store: KVBatchStore, batch_id: str, scope: str = "_") -> None:
    position = await store.append_to_index(scope, batch_id)
    await store.put(StoredBatch(batch=make_batch(batch_id), index_position=position))


async def test_index_pages_newest_first_across_page_boundaries(kv_store: KVBatchStore) -> None:
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


async def test_concurrent_appends_keep_every_id(kv_store: KVBatchStore) -> None:
    ids = [f"batch_c{n}" for n in range(PAGE_SIZE + 20)]
    positions = await asyncio.gather(*(kv_store.append_to_index("_", batch_id) for batch_id in ids))
    assert len({(p.page, p.slot) for p in positions}) == len(ids)
    assert sorted(await kv_store.newest_ids("_", None, 1000)) == sorted(ids)


async def test_scopes_have_separate_indexes(kv_store: KVBatchStore) -> None:
    await add(kv_store, "batch_x", scope="alice")
    await add(kv_store, "batch_y", scope="bob")
    assert await kv_store.newest_ids("alice", None, 10) == ["batch_x"]
    assert await kv_store.newest_ids("bob", None, 10) == ["batch_y"]


async def test_a_page_costs_reads_in_proportion_to_its_size(tmp_path: Path) -> None:
    register_kvstore_backends({"kv_count": SqliteKVStoreConfig(db_path=str(tmp_path / "count.db"))})
    kvstore = await kvstore_impl(KVStoreReference(backend="kv_count", namespace="n"))
    counting = CountingKV(kvstore)
    store = KVBatchStore(counting, "n")  # type: ignore[arg-type]
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


async def test_the_active_list_keeps_creation_order(kv_store: KVBatchStore) -> None:
    for batch_id in ("batch_1", "batch_2", "batch_3"):
        await kv_store.add_active(batch_id)
    await kv_store.add_active("batch_2")
    await kv_store.retire("batch_1")
    await kv_store.retire("batch_unknown")
    assert await kv_store.active_ids() == ["batch_2", "batch_3"]


async def test_the_layout_version_is_written_once_and_checked(kv_store: KVBatchStore) -> None:
    await kv_store.initialize()
    await kv_store.initialize()
    await kv_store._kv.set(kv_store._prefix + "layout", '{"version": 2}')
    with pytest.raises(RuntimeError, match="layout"):
        await kv_store.initialize()


async def test_a_second_server_on_the_same_kvstore_is_reported(
    kv_store: KVBatchStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_store_module, "LOOKS_PER_ALONE_CHECK", 1)  # check at every look, not every tenth
    # An earlier run of this server left its record: that alone is no second server.
    await kv_store._kv.set(kv_store._prefix + "server", json.dumps({"holder": "earlier-run", "beat": 7}))
    for _ in range(3):
        await kv_store.claim("this-server", 1, lease_seconds=30)
    assert "Another server" not in caplog.text

    other = KVBatchStore(kv_store._kv, kv_store._prefix.split("/")[0])
    for _ in range(3):
        await other.claim("other-server", 1, lease_seconds=30)
        await kv_store.claim("this-server", 1, lease_seconds=30)
    # Each server reports the other, once.
    assert caplog.text.count("Another server runs batches from this kvstore") == 2
