import asyncio
import errno
import time
from typing import Any

import pytest
from sqlalchemy import delete

from llama_stack_provider_batches.config import BatchesProviderConfig
from llama_stack_provider_batches.domain.ownership import Owner, current_owner
from llama_stack_provider_batches.engine.housekeeping import (
    DAY_SECONDS,
    FIRST_RETRY_SECONDS,
    MAX_DELETE_TRIES,
    Housekeeper,
)
from llama_stack_provider_batches.stack import ResourceNotFoundError
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.unit.storage.test_retention import end, running

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


class Broken(DeletingFiles):
    """Deletes as DeletingFiles does, but every delete of `failing` raises `error`."""

    def __init__(self, failing: str, error: Exception) -> None:
        super().__init__(set())
        self.failing, self.error = failing, error

    async def openai_delete_file(self, request: Any) -> None:
        if request.file_id == self.failing:
            raise self.error
        await super().openai_delete_file(request)


async def an_ended_batch_past_its_retention(store: SQLBatchStore) -> None:
    await running(store, "batch_old")
    await end(store, "batch_old", output_file_id="file-out")


async def test_a_delete_that_fails_is_tried_later_and_the_sweep_goes_on(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    now = [time.time() + 3 * DAY_SECONDS]  # the batch below ends now, by the store's clock
    files = Broken("file-bad", PermissionError("not yours any more"))
    await store.retention.expire_file_at("file-bad", "batch_1", ALICE, 10.0)  # first, every time
    await store.retention.expire_file_at("file-a", "batch_1", ALICE, 20.0)
    await an_ended_batch_past_its_retention(store)
    keeper = Housekeeper(store.retention, files, config.model_copy(update={"retention_days": 1}), clock=lambda: now[0])
    await keeper.sweep()
    assert [file_id for file_id, _ in files.deleted] == ["file-a"]  # the one after the failing one
    assert await store.get("batch_old") is None  # retention and leftovers ran too
    assert await store.retention.files_due(now[0], 10) == []  # pushed back, not forgotten
    [due] = await store.retention.files_due(now[0] + FIRST_RETRY_SECONDS, 10)
    assert due.file_id == "file-bad"
    for _ in range(MAX_DELETE_TRIES - 1):  # each try later than the one before, then given up
        assert await store.retention.files_due(now[0] + FIRST_RETRY_SECONDS * 2**MAX_DELETE_TRIES, 10)
        now[0] += FIRST_RETRY_SECONDS * 2**MAX_DELETE_TRIES
        await keeper.sweep()
    assert await store.retention.files_due(2**40, 10) == []
    assert keeper._delete_tries == {}


async def test_an_outage_of_the_files_api_ends_the_deletes_and_blames_no_file(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    files = Broken("file-b", OSError(errno.EROFS, "Read-only file system"))
    await store.retention.expire_file_at("file-b", "batch_1", ALICE, 10.0)
    await store.retention.expire_file_at("file-c", "batch_1", ALICE, 20.0)
    await an_ended_batch_past_its_retention(store)
    later = time.time() + 3 * DAY_SECONDS
    keeper = Housekeeper(store.retention, files, config.model_copy(update={"retention_days": 1}), clock=lambda: later)
    with pytest.raises(OSError):  # run() logs it once while it lasts, and tries again later
        await keeper.sweep()
    assert files.deleted == [] and keeper._delete_tries == {}
    assert [f.file_id for f in await store.retention.files_due(100.0, 10)] == ["file-b", "file-c"]  # due as before
    assert await store.get("batch_old") is None  # the store's own steps ran all the same


async def test_the_first_sweep_gives_batches_ended_before_this_release_their_retention(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    await running(store, "batch_old")
    await end(store, "batch_old", output_file_id="file-out", completed_at=1000)
    await store._db.write(delete(store._db.ended))  # as an earlier release, or the kvstore upgrade, left it
    keeper = Housekeeper(store.retention, DeletingFiles(set()), config, clock=lambda: 1000 + 31 * DAY_SECONDS)
    await keeper.sweep()
    assert await store.get("batch_old") is None
