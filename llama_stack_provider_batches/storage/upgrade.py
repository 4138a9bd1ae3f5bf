"""Moving the data of earlier releases into the SQL database, once, at start-up.

Earlier releases kept batches in the stack's kvstore, under `<namespace>/v1/`:

    batch/<batch_id>                   a StoredBatch record (a single server, without `sql_store`)
    results/<batch_id>/<n>             its result chunks (epoch 0: a single server)
    results/<batch_id>/e<epoch>/<n>    result chunks written under a lease (with `sql_store`)
    ids/<batch_id>/<n>                 the custom_ids of a running batch

With `sql_store` set, their records were already in the batches table, whose layout is unchanged.
The upgrade inserts every kvstore record the table lacks (finished batches too, so they keep their
ids, owners, idempotency keys and place in the list), then copies the chunks of every unfinished
batch into the chunks table, so that they resume from their stored results. Every step is
idempotent: servers and worker processes that start together, or a start interrupted half-way,
do the same work again without harm. A marker written last (the only key this release writes to the
kvstore) makes later starts skip it all. Nothing is deleted from the kvstore.
"""

import json

from sqlalchemy import select

from ..domain.lifecycle import UNFINISHED_STATUSES
from ..domain.records import StoredBatch, is_batch_id
from ..stack import KVStore, get_logger
from .database import Database, SqlChunks, batch_row
from .store import IDS_PER_CHUNK

logger = get_logger(name=__name__, category="providers")

LEGACY_VERSION = "v1"
DONE_MARKER = "moved-to-sql"
NS_PER_SECOND = 10**9


def legacy_created_ns(stored: StoredBatch, record: dict[str, object]) -> int:
    """A list position for a kvstore record: its creation second, then its place in the old list index
    (page and slot, kept in the record), so that batches created in one second keep their order."""
    position = record.get("index_position")
    offset = 0
    if isinstance(position, dict):
        offset = int(position.get("page", 0)) * 100 + int(position.get("slot", 0))
    return stored.batch.created_at * NS_PER_SECOND + offset


class LegacyUpgrade:
    """Copies what an earlier release left in the kvstore into the database."""

    def __init__(self, kvstore: KVStore, namespace: str, database: Database) -> None:
        self._kv = kvstore
        self._prefix = f"{namespace}/{LEGACY_VERSION}/"
        self._db = database
        self._chunks = SqlChunks(database)

    async def run(self) -> None:
        if await self._kv.get(self._prefix + DONE_MARKER) is not None:
            return
        # Only a single server wrote `layout`; replicas of an earlier release kept their records in the
        # table already, but their results in the kvstore too: those are copied in either case.
        copied = await self._copy_records() if await self._kv.get(self._prefix + "layout") is not None else 0
        resumed = await self._copy_chunks_of_unfinished()
        if copied or resumed:
            logger.info("Moved batches from the kvstore into the SQL store.", records=copied, unfinished=resumed)
        await self._kv.set(self._prefix + DONE_MARKER, "1")

    async def _legacy_ids(self) -> list[str]:
        marker = f"/{LEGACY_VERSION}/batch/"
        # Backends return keys with or without their namespace; the id is whatever follows the marker.
        keys = await self._kv.keys_in_range(self._prefix + "batch/", self._prefix + "batch/\uffff")
        return sorted({key.rsplit(marker, 1)[-1] for key in keys if marker in key})

    async def _copy_records(self) -> int:
        copied = 0
        for batch_id in await self._legacy_ids():
            raw = await self._kv.get(f"{self._prefix}batch/{batch_id}")
            if raw is None or not is_batch_id(batch_id):
                continue
            stored = StoredBatch.model_validate_json(raw)
            await self._insert_if_missing(stored, legacy_created_ns(stored, json.loads(raw)))
            copied += 1
        return copied

    async def _insert_if_missing(self, stored: StoredBatch, created_ns: int) -> None:
        insert = self._db.insert(self._db.batches).values(**batch_row(stored, created_ns)).on_conflict_do_nothing()
        await self._db.write(insert)

    async def _copy_chunks_of_unfinished(self) -> int:
        table = self._db.batches
        query = select(table.c.id, table.c.lease_epoch, table.c.record).where(table.c.status.in_(UNFINISHED_STATUSES))
        rows = await self._db.read(query)
        for row in rows:
            total = StoredBatch.model_validate_json(row.record).batch.request_counts
            await self._copy_ids(row.id, total.total if total else 0)
            for epoch in range(row.lease_epoch + 1):
                await self._copy_results(row.id, epoch)
        return len(rows)

    async def _copy_ids(self, batch_id: str, total: int) -> None:
        for chunk in range((total + IDS_PER_CHUNK - 1) // IDS_PER_CHUNK):
            await self._copy(f"ids/{batch_id}/{chunk}")

    async def _copy_results(self, batch_id: str, epoch: int) -> None:
        base = f"results/{batch_id}/" if epoch == 0 else f"results/{batch_id}/e{epoch}/"
        chunk = 0
        while await self._copy(f"{base}{chunk}"):
            chunk += 1

    async def _copy(self, key: str) -> bool:
        """Copy one chunk; False if the kvstore has none under this key."""
        value = await self._kv.get(self._prefix + key)
        if value is None:
            return False
        await self._chunks.set(key, value)
        return True
