"""The single-server connector: batches laid out in the stack's key-value store.

Layout, under `<namespace>/v1/` (the `v1` is the layout version a later release migrates from):

    layout                         {"version": 1}, written once: a later release reads it to migrate
    batch/<batch_id>               StoredBatch JSON: the OpenAI batch object plus provider bookkeeping
    active                         JSON list of the ids of unfinished batches, in creation order
    results/...                    finished request results (store.ResultChunks)
    ids/...                        the custom_ids of running batches (store.RequestIds)
    idem/<scope>/<sha256(key)>     the batch id an idempotency key was first used for
    index/<scope>/head             IndexHead JSON: the newest index page and how full it is
    index/<scope>/page/<n>         JSON list of up to PAGE_SIZE batch ids, oldest first
    server                         {"holder", "beat"}: the server that last looked for work, and its count of looks

`scope` separates the batches of different owners (ownership.py); it is `_` for unowned batches.

The key-value interface only guarantees point reads and writes: its range queries differ between
backends (inclusive or exclusive ends, prefix scans over the whole keyspace on Redis). The list
index is therefore a chain of fixed-size pages read by key, so a page of `limit` batches costs
about `limit / PAGE_SIZE + 1` page reads plus `limit` batch reads, however many batches exist.

The kvstore offers no compare-and-set, so read-modify-write sequences (status updates, index
appends) are serialised per key with asyncio locks, and leases are kept in memory: this is right
for one server process and wrong for several sharing a store; those use SQLBatchStore. Leases here
are all of epoch 0, whose result chunks each run continues numbering. Every tenth look for work
records this server under `server`; seeing another server's record advance between two such looks
means several servers share this store without `sql_store`, and is logged as the error it is.
"""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from llama_stack.log import get_logger
from llama_stack_api import BatchNotFoundError
from llama_stack_api.internal.kvstore import KVStore
from pydantic import BaseModel

from .ownership import scope_of
from .store import (
    LAYOUT_VERSION,
    BatchPage,
    BatchStore,
    IndexPosition,
    Lease,
    RequestIds,
    ResultChunks,
    StoredBatch,
)

logger = get_logger(name=__name__, category="providers")

PAGE_SIZE = 100
LOOKS_PER_ALONE_CHECK = 10  # the claim loop looks for work every second


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


class KVBatchStore(BatchStore):
    """Batches, idempotency keys, the list index and the work queue, kept in one KVStore namespace."""

    def __init__(self, kvstore: KVStore, namespace: str) -> None:
        self._kv = kvstore
        # The SQLite backend ignores the stack's namespace, so every key carries it as well.
        self._prefix = f"{namespace}/v{LAYOUT_VERSION}/"
        self._locks = KeyedLocks()
        self._held: set[str] = set()  # ids of the batches whose lease this process holds
        self._looks = 0
        self._other_server: dict[str, Any] | None = None  # another server's record, when last seen
        self._reported: set[str] = set()
        self.results = ResultChunks(kvstore, self._prefix)
        self.request_ids = RequestIds(kvstore, self._prefix)

    async def initialize(self) -> None:
        """Mark a new store with this layout version; refuse a store written in another one."""
        key = f"{self._prefix}layout"
        raw = await self._kv.get(key)
        if raw is None:
            await self._kv.set(key, json.dumps({"version": LAYOUT_VERSION}))
        elif json.loads(raw).get("version") != LAYOUT_VERSION:
            raise RuntimeError(f"The batches store at {self._prefix!r} has layout {raw}; this release reads version 1.")

    async def close(self) -> None:
        """Nothing to release: the stack owns the kvstore."""

    # --- keys -----------------------------------------------------------------------------------

    def _active_key(self) -> str:
        return f"{self._prefix}active"

    def _batch_key(self, batch_id: str) -> str:
        return f"{self._prefix}batch/{batch_id}"

    def _idempotency_key(self, scope: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self._prefix}idem/{scope}/{digest}"

    def _index_head_key(self, scope: str) -> str:
        return f"{self._prefix}index/{scope}/head"

    def _index_page_key(self, scope: str, page: int) -> str:
        return f"{self._prefix}index/{scope}/page/{page}"

    # --- batches --------------------------------------------------------------------------------

    async def get(self, batch_id: str) -> StoredBatch | None:
        raw = await self._kv.get(self._batch_key(batch_id))
        return StoredBatch.model_validate_json(raw) if raw else None

    async def put(self, stored: StoredBatch) -> None:
        """Write a batch record as it is (creation; updates go through `update_record`)."""
        await self._kv.set(self._batch_key(stored.batch.id), stored.model_dump_json())

    async def create(
        self, stored: StoredBatch, claim_for: str | None = None, lease_seconds: float = 0.0
    ) -> tuple[StoredBatch, Lease | None]:
        key = stored.idempotency_key
        if key is None:
            return await self._insert(stored, claim_for)
        scope = scope_of(stored.owner)
        async with self._locks.hold(self._idempotency_key(scope, key)):
            existing_id = await self._kv.get(self._idempotency_key(scope, key))
            existing = await self.get(existing_id) if existing_id else None
            if existing is not None:
                return existing, None
            # The key is written before the batch, so a crash in between leaves a key whose batch
            # is missing; a retry then creates the batch under the id the key names.
            if existing_id is None:
                await self._kv.set(self._idempotency_key(scope, key), stored.batch.id)
            else:
                stored = stored.model_copy(update={"batch": stored.batch.model_copy(update={"id": existing_id})})
            return await self._insert(stored, claim_for)

    async def _insert(self, stored: StoredBatch, claim_for: str | None) -> tuple[StoredBatch, Lease | None]:
        batch_id = stored.batch.id
        lease = None
        if claim_for is not None:
            self._held.add(batch_id)
            lease = Lease(batch_id, claim_for, epoch=0)
        position = await self.append_to_index(scope_of(stored.owner), batch_id)
        stored = stored.model_copy(update={"index_position": position})
        await self.put(stored)
        await self.add_active(batch_id)  # last: a claim must never find a batch whose record is not written
        return stored, lease

    async def update_record(
        self, batch_id: str, change: Callable[[StoredBatch], StoredBatch], lease: Lease | None = None
    ) -> StoredBatch:
        # One process holds every lease here, so `lease` cannot have been taken over.
        async with self._locks.hold(self._batch_key(batch_id)):
            stored = await self.get(batch_id)
            if stored is None:
                raise BatchNotFoundError(batch_id)
            changed = change(stored)
            if changed != stored:
                await self.put(changed)
            return changed

    # --- work queue -----------------------------------------------------------------------------

    async def active_ids(self) -> list[str]:
        """The ids of batches not yet finished, oldest first."""
        raw = await self._kv.get(self._active_key())
        return json.loads(raw) if raw else []

    async def add_active(self, batch_id: str) -> None:
        async with self._locks.hold(self._active_key()):
            ids = await self.active_ids()
            if batch_id not in ids:
                await self._kv.set(self._active_key(), json.dumps([*ids, batch_id]))

    async def retire(self, batch_id: str) -> None:
        async with self._locks.hold(self._active_key()):
            ids = await self.active_ids()
            if batch_id in ids:
                ids.remove(batch_id)
                await self._kv.set(self._active_key(), json.dumps(ids))

    async def claim(self, holder: str, count: int, lease_seconds: float) -> list[Lease]:
        if self._looks % LOOKS_PER_ALONE_CHECK == 0:  # a write every look would be a write a second, forever
            await self._check_alone(holder)
        self._looks += 1
        leases = []
        for batch_id in await self.active_ids():
            if len(leases) == count:
                break
            if batch_id not in self._held:
                self._held.add(batch_id)
                leases.append(Lease(batch_id, holder, epoch=0))
        return leases

    async def claim_batch(self, batch_id: str, holder: str, lease_seconds: float) -> Lease | None:
        if batch_id in self._held or batch_id not in await self.active_ids():
            return None
        self._held.add(batch_id)
        return Lease(batch_id, holder, epoch=0)

    async def waiting_ids(self, count: int) -> list[str]:
        return [batch_id for batch_id in await self.active_ids() if batch_id not in self._held][:count]

    async def _check_alone(self, holder: str) -> None:
        """Record this server's look for work; log an error if another server is looking too."""
        key = f"{self._prefix}server"
        raw = await self._kv.get(key)
        seen = json.loads(raw) if raw else None
        if seen and seen["holder"] != holder:
            # A record left by an earlier run of this server stays as it was; a live server's changes.
            other = seen["holder"]
            last_seen = self._other_server
            alive = last_seen is not None and last_seen["holder"] == other and last_seen != seen
            if alive and other not in self._reported:
                self._reported.add(other)
                logger.error(
                    "Another server runs batches from this kvstore, so both run every batch: give every server"
                    " the same `sql_store` (see the README's deployment section).",
                    other_server=other,
                )
            self._other_server = seen
        await self._kv.set(key, json.dumps({"holder": holder, "beat": self._looks}))

    async def renew(self, lease: Lease, lease_seconds: float) -> str | None:
        stored = await self.get(lease.batch_id) if lease.batch_id in self._held else None
        return stored.batch.status if stored else None

    async def release(self, lease: Lease) -> None:
        self._held.discard(lease.batch_id)

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

    async def page(self, scope: str, after: str | None, limit: int) -> BatchPage | None:
        before = None
        if after is not None:
            cursor = await self.get(after)
            if cursor is None or scope_of(cursor.owner) != scope or cursor.index_position is None:
                return None
            before = cursor.index_position
        ids = await self.newest_ids(scope, before, limit + 1)
        found = await asyncio.gather(*(self.get(batch_id) for batch_id in ids[:limit]))
        return BatchPage([stored for stored in found if stored is not None], has_more=len(ids) > limit)
