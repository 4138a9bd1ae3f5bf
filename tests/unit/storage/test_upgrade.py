"""Data of earlier releases, laid out in the kvstore as they wrote it, is found, listed and resumed
from the SQL store (every kvstore backend that runs here). The integration test
tests/integration/test_upgrade.py does the same with a store the previous release itself wrote."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from openai.types.batch_request_counts import BatchRequestCounts

from llama_stack_provider_batches.domain.ownership import Owner, scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.domain.results import ResultEntry, decode_results, encode_results
from llama_stack_provider_batches.stack import KVStore
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.unit.backends import KV_BACKENDS, SQL_BACKENDS, open_kvstore, sql_reference
from tests.unit.helpers import make_batch

COUNTS_3 = BatchRequestCounts(completed=0, failed=0, total=3)
ALICE = Owner(principal="alice", attributes={"roles": ["a"]})


async def write_legacy(kv: KVStore, namespace: str, stored: StoredBatch, page: int, slot: int) -> None:
    """A batch record as the kvstore layout v1 kept it, with its place in the old list index."""
    record = json.loads(stored.model_dump_json())
    record["index_position"] = {"page": page, "slot": slot}
    await kv.set(f"{namespace}/v1/batch/{stored.batch.id}", json.dumps(record))


@pytest.fixture(params=KV_BACKENDS)
async def legacy_kv(request, tmp_path: Path) -> AsyncIterator[tuple[KVStore, str]]:
    """A kvstore holding what a single server of an earlier release left: two finished batches of one
    second, one of them with an idempotency key, and one running batch with stored results."""
    async with open_kvstore(request.param, tmp_path) as (kv, namespace):
        await kv.set(f"{namespace}/v1/layout", json.dumps({"version": 1}))
        done = make_batch("batch_done", status="completed", created_at=100)
        await write_legacy(kv, namespace, StoredBatch(batch=done, owner=ALICE, idempotency_key="k1"), 0, 0)
        failed = make_batch("batch_failed", status="failed", created_at=100)
        await write_legacy(kv, namespace, StoredBatch(batch=failed, owner=ALICE), 0, 1)
        running = make_batch("batch_running", status="in_progress", created_at=101, request_counts=COUNTS_3)
        await write_legacy(kv, namespace, StoredBatch(batch=running, owner=ALICE, idempotency_key="k2"), 0, 2)
        await kv.set(f"{namespace}/v1/active", json.dumps(["batch_running"]))
        await kv.set(f"{namespace}/v1/results/batch_running/0", encode_results([ResultEntry(1, True, "{}")]))
        await kv.set(f"{namespace}/v1/ids/batch_running/0", json.dumps(["a", "b", "c"]))
        yield kv, namespace


@pytest.mark.parametrize("sql_backend", SQL_BACKENDS)
async def test_every_batch_of_a_single_server_is_found_listed_and_resumed(
    legacy_kv: tuple[KVStore, str], sql_backend: str, tmp_path: Path
) -> None:
    kv, namespace = legacy_kv
    async with sql_reference(sql_backend, tmp_path) as reference:
        for _ in range(2):  # two processes start: the second finds the work done
            store = SQLBatchStore(reference, kv, namespace)
            await store.initialize()

        scope = scope_of(ALICE)
        page = await store.page(scope, None, 10)
        assert page is not None
        assert [s.batch.id for s in page.batches] == ["batch_running", "batch_failed", "batch_done"]
        assert (await store.get_batch("batch_done")).status == "completed"
        replay, lease = await store.create(
            StoredBatch(batch=make_batch("batch_new"), owner=ALICE, idempotency_key="k1")
        )
        assert (replay.batch.id, lease) == ("batch_done", None)  # its key still names it

        [lease] = await store.claim("server-a", 10, lease_seconds=30)
        assert (lease.batch_id, lease.epoch) == ("batch_running", 1)
        stored = [
            entry.position async for chunk in store.results.read("batch_running") for entry in decode_results(chunk)
        ]
        assert stored == [1]  # resumes from the result the earlier release stored
        assert await store.request_ids.load("batch_running") == ["a", "b", "c"]
        await store.close()


async def test_a_start_after_the_upgrade_reads_nothing_from_the_kvstore(
    legacy_kv: tuple[KVStore, str], tmp_path: Path
) -> None:
    kv, namespace = legacy_kv
    async with sql_reference("sqlite", tmp_path) as reference:
        store = SQLBatchStore(reference, kv, namespace)
        await store.initialize()
        await write_legacy(kv, namespace, StoredBatch(batch=make_batch("batch_late")), 0, 3)
        await store.initialize()  # the marker says it is done
        assert await store.get("batch_late") is None
        await store.close()


async def test_a_replica_deployment_keeps_its_table_and_its_results_move_in(tmp_path: Path) -> None:
    """Earlier releases with `sql_store` kept records in the same table, and results in the kvstore."""
    async with open_kvstore("sqlite", tmp_path) as (kv, namespace), sql_reference("sqlite", tmp_path) as reference:
        earlier = SQLBatchStore(reference, kv, namespace)
        await earlier.initialize()
        await earlier.create(StoredBatch(batch=make_batch("batch_r", status="in_progress", request_counts=COUNTS_3)))
        [old_lease] = await earlier.claim("server-a", 1, lease_seconds=0.01)
        await kv.delete(f"{namespace}/v1/moved-to-sql")  # earlier replicas wrote no `layout` record
        await kv.set(f"{namespace}/v1/results/batch_r/e1/0", encode_results([ResultEntry(0, True, "{}")]))
        await earlier.close()

        upgraded = SQLBatchStore(reference, kv, namespace)
        await upgraded.initialize()
        [lease] = await upgraded.claim("server-b", 1, lease_seconds=30)
        assert lease.epoch == old_lease.epoch + 1
        chunks = [chunk async for chunk in upgraded.results.read("batch_r")]
        assert [entry.position for chunk in chunks for entry in decode_results(chunk)] == [0]
        await upgraded.close()
