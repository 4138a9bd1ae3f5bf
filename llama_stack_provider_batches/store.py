"""How batches are laid out in the stack's key-value store, and the only code that reads or writes it.

Layout, under `<namespace>/v1/` (the `v1` is the layout version a later release migrates from):

    layout                         {"version": 1}, written once: a later release reads it to migrate
    batch/<batch_id>               StoredBatch JSON: the OpenAI batch object plus provider bookkeeping
    active                         JSON list of the ids of unfinished batches, in creation order
    results/<batch_id>/<n>         the n-th chunk of finished request results, in finishing order
    idem/<scope>/<sha256(key)>     the batch id an idempotency key was first used for
    index/<scope>/head             IndexHead JSON: the newest index page and how full it is
    index/<scope>/page/<n>         JSON list of up to PAGE_SIZE batch ids, oldest first

`scope` separates the batches of different owners (ownership.py); it is `_` for unowned batches.

The key-value interface only guarantees point reads and writes: its range queries differ between
backends (inclusive or exclusive ends, prefix scans over the whole keyspace on Redis). The list
index is therefore a chain of fixed-size pages read by key, so a page of `limit` batches costs
about `limit / PAGE_SIZE + 1` page reads plus `limit` batch reads, however many batches exist.

A results chunk holds results in the text form of results.py. Only the job running a batch writes
its chunks, numbering them from 0; they are read back by probing keys in order until one is
missing, so no count has to be kept in step with them.

Read-modify-write sequences (status updates, index appends) are serialised per key with asyncio
locks, which is enough inside one server process.
"""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from llama_stack_api import BatchNotFoundError, BatchObject
from llama_stack_api.internal.kvstore import KVStore
from pydantic import BaseModel

from .ownership import Owner
from .results import ResultEntry, encode_results

LAYOUT_VERSION = 1
PAGE_SIZE = 100


class IndexPosition(BaseModel):
    """Where a batch id sits in its scope's list index."""

    page: int
    slot: int


class StoredBatch(BaseModel):
    """A batch as stored: the object clients see, and what the provider keeps beside it."""

    batch: BatchObject
    owner: Owner | None = None  # its storage scope is scope_of(owner)
    # Whether the creating request carried provider credentials; they are never stored themselves.
    request_credentials: bool = False
    idempotency_key: str | None = None
    index_position: IndexPosition | None = None
    # Result files already uploaded by an interrupted finalization ("output"/"error" -> file id).
    uploaded_files: dict[str, str] = {}


class IndexHead(BaseModel):
    """The newest page of a scope's index and the number of ids in it."""

    page: int = 0
    count: int = 0


class KeyedLocks:
    """One asyncio lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]


class BatchStore:
    """Batches, idempotency keys and the list index, kept in one KVStore namespace."""

    def __init__(self, kvstore: KVStore, namespace: str) -> None:
        self._kv = kvstore
        # The SQLite backend ignores the stack's namespace, so every key carries it as well.
        self._prefix = f"{namespace}/v{LAYOUT_VERSION}/"
        self._locks = KeyedLocks()

    # --- keys -----------------------------------------------------------------------------------

    async def check_layout(self) -> None:
        """Mark a new store with this layout version; refuse a store written in another one."""
        key = f"{self._prefix}layout"
        raw = await self._kv.get(key)
        if raw is None:
            await self._kv.set(key, json.dumps({"version": LAYOUT_VERSION}))
        elif json.loads(raw).get("version") != LAYOUT_VERSION:
            raise RuntimeError(f"The batches store at {self._prefix!r} has layout {raw}; this release reads version 1.")

    def _active_key(self) -> str:
        return f"{self._prefix}active"

    def _batch_key(self, batch_id: str) -> str:
        return f"{self._prefix}batch/{batch_id}"

    def _idempotency_key(self, scope: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self._prefix}idem/{scope}/{digest}"

    def _results_key(self, batch_id: str, chunk: int) -> str:
        return f"{self._prefix}results/{batch_id}/{chunk}"

    def _index_head_key(self, scope: str) -> str:
        return f"{self._prefix}index/{scope}/head"

    def _index_page_key(self, scope: str, page: int) -> str:
        return f"{self._prefix}index/{scope}/page/{page}"

    # --- batches --------------------------------------------------------------------------------

    async def get(self, batch_id: str) -> StoredBatch | None:
        """The stored batch, or None if there is none with this id."""
        raw = await self._kv.get(self._batch_key(batch_id))
        return StoredBatch.model_validate_json(raw) if raw else None

    async def get_batch(self, batch_id: str) -> BatchObject:
        """The batch object; BatchNotFoundError if there is none."""
        stored = await self.get(batch_id)
        if stored is None:
            raise BatchNotFoundError(batch_id)
        return stored.batch

    async def put(self, stored: StoredBatch) -> None:
        """Write a batch record as it is (creation; updates go through `update`)."""
        await self._kv.set(self._batch_key(stored.batch.id), stored.model_dump_json())

    async def update_record(self, batch_id: str, change: Callable[[StoredBatch], StoredBatch]) -> StoredBatch:
        """Apply `change` to the stored record atomically with respect to other updates; return the result.

        `change` may raise (for example IllegalTransitionError); then nothing is written.
        """
        async with self._locks.hold(self._batch_key(batch_id)):
            stored = await self.get(batch_id)
            if stored is None:
                raise BatchNotFoundError(batch_id)
            changed = change(stored)
            if changed != stored:
                await self.put(changed)
            return changed

    async def update(self, batch_id: str, change: Callable[[BatchObject], BatchObject]) -> BatchObject:
        """Apply `change` to the stored batch object, as `update_record` does; return the new batch."""
        stored = await self.update_record(batch_id, lambda s: s.model_copy(update={"batch": change(s.batch)}))
        return stored.batch

    # --- request results ------------------------------------------------------------------------

    async def save_result_chunk(self, batch_id: str, chunk: int, entries: list[ResultEntry]) -> None:
        """Store results as chunk number `chunk` of the batch (its writer numbers chunks 0, 1, 2...)."""
        await self._kv.set(self._results_key(batch_id, chunk), encode_results(entries))

    async def result_chunks(self, batch_id: str) -> AsyncIterator[str]:
        """Yield every stored results chunk of a batch, in order, one at a time."""
        chunk = 0
        while (text := await self._kv.get(self._results_key(batch_id, chunk))) is not None:
            yield text
            chunk += 1

    async def delete_results(self, batch_id: str, chunks: int) -> None:
        """Drop the result chunks of a finished batch (its files now hold them)."""
        for chunk in range(chunks):
            await self._kv.delete(self._results_key(batch_id, chunk))

    # --- unfinished batches ---------------------------------------------------------------------

    async def active_ids(self) -> list[str]:
        """The ids of batches not yet finished, oldest first."""
        raw = await self._kv.get(self._active_key())
        return json.loads(raw) if raw else []

    async def add_active(self, batch_id: str) -> None:
        async with self._locks.hold(self._active_key()):
            ids = await self.active_ids()
            if batch_id not in ids:
                await self._kv.set(self._active_key(), json.dumps([*ids, batch_id]))

    async def remove_active(self, batch_id: str) -> None:
        async with self._locks.hold(self._active_key()):
            ids = await self.active_ids()
            if batch_id in ids:
                ids.remove(batch_id)
                await self._kv.set(self._active_key(), json.dumps(ids))

    # --- idempotency keys -----------------------------------------------------------------------

    @asynccontextmanager
    async def idempotency_guard(self, scope: str, key: str) -> AsyncIterator[None]:
        """Serialise creates that use the same idempotency key."""
        async with self._locks.hold(self._idempotency_key(scope, key)):
            yield

    async def batch_id_for_key(self, scope: str, key: str) -> str | None:
        """The batch id an idempotency key was first used for, if any."""
        return await self._kv.get(self._idempotency_key(scope, key))

    async def remember_key(self, scope: str, key: str, batch_id: str) -> None:
        """Record that an idempotency key now names `batch_id`."""
        await self._kv.set(self._idempotency_key(scope, key), batch_id)

    # --- list index -----------------------------------------------------------------------------

    async def _read_page(self, scope: str, page: int) -> list[str]:
        raw = await self._kv.get(self._index_page_key(scope, page))
        return json.loads(raw) if raw else []

    async def _read_head(self, scope: str) -> IndexHead:
        raw = await self._kv.get(self._index_head_key(scope))
        return IndexHead.model_validate_json(raw) if raw else IndexHead()

    async def append_to_index(self, scope: str, batch_id: str) -> IndexPosition:
        """Add a batch id as the newest entry of its scope's index; return where it went."""
        async with self._locks.hold(self._index_head_key(scope)):
            head = await self._read_head(scope)
            if head.count == PAGE_SIZE:
                head = IndexHead(page=head.page + 1, count=0)
            ids = await self._read_page(scope, head.page) if head.count else []
            # A page may hold ids beyond head.count if a previous append died between its two writes.
            ids = [*ids[: head.count], batch_id]
            await self._kv.set(self._index_page_key(scope, head.page), json.dumps(ids))
            await self._kv.set(self._index_head_key(scope), IndexHead(page=head.page, count=len(ids)).model_dump_json())
            return IndexPosition(page=head.page, slot=len(ids) - 1)

    async def newest_ids(self, scope: str, before: IndexPosition | None, count: int) -> list[str]:
        """Up to `count` batch ids of a scope, newest first, all older than `before` if it is given."""
        if before is None:
            head = await self._read_head(scope)
            if head.count == 0:
                return []
            page, end = head.page, head.count
        else:
            page, end = before.page, before.slot
        found: list[str] = []
        while len(found) < count and page >= 0:
            ids = await self._read_page(scope, page)
            found.extend(reversed(ids[:end]))
            page, end = page - 1, PAGE_SIZE
        return found[:count]

    async def get_many(self, batch_ids: list[str]) -> list[StoredBatch]:
        """The stored batches for these ids, in the same order, skipping ids with no record."""
        found = await asyncio.gather(*(self.get(batch_id) for batch_id in batch_ids))
        return [stored for stored in found if stored is not None]
