"""What keeps the store bounded: batch records removed after their retention, result files deleted
when they expire, and what a crashed or overtaken process left behind.

    <name>_ended          when each batch ended, written in the transaction that ended it (sql_store.py);
                          batches that ended before it existed get theirs from `record_missing_ends`
    <name>_file_expiries  result files to delete at `expires_at` (a batch's `output_expires_after`)

Every method works on a bounded number of rows, oldest first, so one sweep never holds the database
long; the sweep (engine/housekeeping.py) runs them again until nothing is left.

The stored results of a batch that ended without any result file (it gave up while the Files API
could not be written, job.py) are its only copy: they stay until its record's retention removes them.
"""

from dataclasses import dataclass

from sqlalchemy import and_, delete, exists, func, or_, select, update

from ..domain.lifecycle import TERMINAL_STATUSES, TIMESTAMP_FIELD
from ..domain.ownership import Owner
from ..domain.records import StoredBatch
from .database import Database

# Batches whose chunks one statement looks for (two key ranges each): SQLite refuses expressions
# deeper than 1,000 terms.
RANGES_PER_STATEMENT = 100


@dataclass(frozen=True)
class ExpiringFile:
    file_id: str
    batch_id: str
    owner: Owner | None


@dataclass(frozen=True)
class Removed:
    """What a sweep step removed: rows of every table, and the bytes of the batch records and chunks."""

    rows: int = 0
    bytes: int = 0


class RetentionStore:
    """Retention and clean-up over the provider's tables."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def expire_file_at(self, file_id: str, batch_id: str, owner: Owner | None, expires_at: float) -> None:
        insert = self._db.insert(self._db.file_expiries).values(
            file_id=file_id,
            batch_id=batch_id,
            owner=owner.model_dump_json() if owner is not None else None,
            expires_at=expires_at,
        )
        await self._db.write(insert.on_conflict_do_nothing())

    async def files_due(self, now: float, limit: int) -> list[ExpiringFile]:
        table = self._db.file_expiries
        due = select(table).where(table.c.expires_at <= now).order_by(table.c.expires_at).limit(limit)
        return [
            ExpiringFile(row.file_id, row.batch_id, Owner.model_validate_json(row.owner) if row.owner else None)
            for row in await self._db.read(due)
        ]

    async def file_expired(self, file_id: str) -> None:
        table = self._db.file_expiries
        await self._db.write(delete(table).where(table.c.file_id == file_id))

    async def retry_file_at(self, file_id: str, when: float) -> None:
        """Make a file due again at `when`: its delete failed, and others due after it come first meanwhile."""
        table = self._db.file_expiries
        await self._db.write(update(table).where(table.c.file_id == file_id).values(expires_at=when))

    async def record_missing_ends(self, now: float, limit: int) -> int:
        """Give up to `limit` ended batches without a row in `<name>_ended` theirs, from the time their
        record says they ended (else `now`); how many. Batches that ended before this table existed, or
        were moved from a kvstore (upgrade.py), have none, and their retention would never come."""
        batches, ended = self._db.batches, self._db.ended
        missing = (
            select(batches.c.id, batches.c.record)
            .where(batches.c.status.in_(TERMINAL_STATUSES), ~exists().where(ended.c.batch_id == batches.c.id))
            .limit(limit)
        )
        rows = await self._db.read(missing)
        if rows:
            values = [{"batch_id": row.id, "ended_at": ended_at(row.record, now)} for row in rows]
            await self._db.write(self._db.insert(ended).values(values).on_conflict_do_nothing())
        return len(rows)

    async def remove_ended_before(self, cutoff: float, limit: int) -> Removed:
        """Remove the records (and anything left of them) of up to `limit` batches that ended before
        `cutoff`, in a few statements for all of them."""
        ended, batches = self._db.ended, self._db.batches
        rows = await self._db.read(select(ended.c.batch_id).where(ended.c.ended_at < cutoff).limit(limit))
        batch_ids = [row.batch_id for row in rows]
        if not batch_ids:
            return Removed()
        [(size,)] = await self._db.read(
            select(func.coalesce(func.sum(func.length(batches.c.record)), 0)).where(batches.c.id.in_(batch_ids))
        )
        gone = await self._db.write(delete(batches).where(batches.c.id.in_(batch_ids)))
        left = await self._remove_stored_work(batch_ids)
        await self._db.write(delete(ended).where(ended.c.batch_id.in_(batch_ids)))
        return Removed(gone.rowcount + len(batch_ids) + left.rows, int(size) + left.bytes)

    async def remove_leftovers(self, limit: int) -> Removed:
        """Remove shard rows and result chunks of batches that have ended: what a process that lost
        its lease, or crashed while a batch was being ended, may have left. The results of a batch
        that ended without result files stay: they are all that is left of them."""
        batches, shards = self._db.batches, self._db.shards
        ended_batches = select(batches.c.id).where(batches.c.status.in_(TERMINAL_STATUSES))
        stale = select(shards.c.batch_id).where(shards.c.batch_id.in_(ended_batches)).distinct().limit(limit)
        batch_ids = [row.batch_id for row in await self._db.read(stale)]
        if not batch_ids:
            return Removed()
        records = await self._db.read(select(batches.c.id, batches.c.record).where(batches.c.id.in_(batch_ids)))
        unwritten = frozenset(row.id for row in records if not has_result_files(row.record))
        return await self._remove_stored_work(batch_ids, keep_results=unwritten)

    async def _remove_stored_work(self, batch_ids: list[str], keep_results: frozenset[str] = frozenset()) -> Removed:
        """The batches' shard rows and chunks (store.py: `results/<batch_id>/...`, `ids/<batch_id>/...`),
        each found by a range of the chunks' primary key; but not the results of `keep_results`."""
        shards, chunks = self._db.shards, self._db.chunks
        count = size = 0
        for start in range(0, len(batch_ids), RANGES_PER_STATEMENT):
            # Keys under "<kind>/<id>/" sort from that prefix up to "<kind>/<id>0" ("0" follows "/").
            under = or_(
                *(
                    and_(chunks.c.key >= f"{kind}/{batch_id}/", chunks.c.key < f"{kind}/{batch_id}0")
                    for batch_id in batch_ids[start : start + RANGES_PER_STATEMENT]
                    for kind in ("results", "ids")
                    if kind == "ids" or batch_id not in keep_results
                )
            )
            [(found, length)] = await self._db.read(
                select(func.count(), func.coalesce(func.sum(func.length(chunks.c.value)), 0)).where(under)
            )
            if found:
                await self._db.write(delete(chunks).where(under))
            count, size = count + int(found), size + int(length)
        tokens = self._db.shard_tokens
        gone = await self._db.write_if(
            delete(shards).where(shards.c.batch_id.in_(batch_ids)),
            delete(tokens).where(tokens.c.batch_id.in_(batch_ids)),
        )
        return Removed(count + gone.rowcount, size)

    async def ended_count(self) -> int:
        [(count,)] = await self._db.read(select(func.count()).select_from(self._db.ended))
        return int(count)


def ended_at(record: str, now: float) -> float:
    """When a stored batch ended: the time its terminal status stamped (`completed_at`, ...), else `now`."""
    batch = StoredBatch.model_validate_json(record).batch
    field = TIMESTAMP_FIELD.get(batch.status)
    stamp = getattr(batch, field) if field is not None else None
    return float(stamp) if stamp is not None else now


def has_result_files(record: str) -> bool:
    """Whether a stored batch has an output or error file: its results were written out."""
    batch = StoredBatch.model_validate_json(record).batch
    return batch.output_file_id is not None or batch.error_file_id is not None
