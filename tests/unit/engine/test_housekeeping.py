import asyncio
from typing import Any

import pytest

from llama_stack_provider_batches.config import BatchesProviderConfig
from llama_stack_provider_batches.domain.ownership import Owner, current_owner
from llama_stack_provider_batches.engine.housekeeping import Housekeeper
from llama_stack_provider_batches.stack import ResourceNotFoundError
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore

ALICE = Owner(principal="alice", attributes={"teams": ["a"]})


class DeletingFiles:
    """Records which file each delete named, and as whom; some files are gone already."""

    def __init__(self, missing: set[str]) -> None:
        self.missing = missing
        self.deleted: list[tuple[str, Owner | None]] = []

    async def openai_delete_file(self, request: Any) -> None:
        if request.file_id in self.missing:
            raise ResourceNotFoundError(request.file_id, "File")
        self.deleted.append((request.file_id, current_owner()))


async def test_expired_files_are_deleted_as_their_owner_and_forgotten(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    files = DeletingFiles(missing={"file-gone"})
    await store.retention.expire_file_at("file-a", "batch_1", ALICE, 10.0)
    await store.retention.expire_file_at("file-gone", "batch_1", ALICE, 10.0)
    await store.retention.expire_file_at("file-later", "batch_1", ALICE, 10_000.0)
    keeper = Housekeeper(store.retention, files, config, clock=lambda: 100.0)
    await keeper.sweep()
    assert [(file_id, owner.principal if owner else None) for file_id, owner in files.deleted] == [("file-a", "alice")]
    assert await store.retention.files_due(100.0, 10) == []  # the one already gone is forgotten too
    assert [f.file_id for f in await store.retention.files_due(10_000.0, 10)] == ["file-later"]


async def test_a_sweep_that_fails_is_tried_again_and_the_loop_stops_when_told(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    calls = 0

    class Flaky(Housekeeper):
        async def sweep(self):  # type: ignore[no-untyped-def, override]
            nonlocal calls
            calls += 1
            raise ConnectionError("store out")

    keeper = Flaky(store.retention, DeletingFiles(set()), config.model_copy(update={"sweep_interval_seconds": 0.01}))
    stopping = asyncio.Event()
    task = asyncio.create_task(keeper.run(stopping))
    await asyncio.sleep(0.1)
    stopping.set()
    await asyncio.wait_for(task, 1)
    assert calls >= 3


async def test_retention_unset_keeps_records_forever(store: SQLBatchStore, config: BatchesProviderConfig) -> None:
    keeper = Housekeeper(store.retention, DeletingFiles(set()), config.model_copy(update={"retention_days": None}))
    assert (await keeper.sweep()).rows == 0


async def test_a_delete_that_fails_otherwise_keeps_the_file_due(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    class Broken(DeletingFiles):
        async def openai_delete_file(self, request: Any) -> None:
            raise OSError(5, "Input/output error")

    await store.retention.expire_file_at("file-b", "batch_1", ALICE, 10.0)
    keeper = Housekeeper(store.retention, Broken(set()), config, clock=lambda: 100.0)
    with pytest.raises(OSError):  # the sweep fails (run() logs it once and tries again later)
        await keeper.sweep()
    assert [f.file_id for f in await store.retention.files_due(100.0, 10)] == ["file-b"]  # tried again next sweep
