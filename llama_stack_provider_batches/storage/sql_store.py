"""The store: batch records, idempotency keys, list order and leases in a SQL database (database.py)
that every worker process and every replica of a deployment shares.

The batches table holds a row per batch:

    id                 the batch id (primary key)
    scope, created_ns  whose batch it is, and when it was created (by its server's clock): the list order
    idempotency_ref    "<scope>/<sha256(key)>" for a batch created with an idempotency key (unique)
    status             the batch's status, kept equal to the record's: what claims look at
    record, version    the StoredBatch JSON, and how many times it has been written
    lease_token, lease_epoch, lease_expires_at   the lease (store.py); no token: nobody holds it
    lease_holder       the server holding the lease, or that held it last

The lease protocol. Every guarantee rests on the database making single statements atomic, never
on timing or on one process being alone:

- Create is one INSERT, so a claim sees a batch whole or not at all, and listing sees it once. The
  unique `idempotency_ref` lets one of any number of concurrent creates with the same key in; the
  others get an integrity error and read the winner's row. A batch that must run where it was
  created (runner.py) is inserted with its lease already taken.
- Updates are compare-and-set on `version`: read the row, compute the change, then
  `UPDATE ... WHERE id = :id AND version = :read_version`; a concurrent writer makes it match no
  row, and the update is computed again from the new row. A job's updates also require
  `lease_token = :its_token`, so a job whose lease was taken over cannot write (LeaseLostError).
- Claim is `UPDATE ... SET lease_token = :new WHERE id = :id AND <nobody holds it>`: of concurrent
  claimers, the database lets exactly one change the row (PostgreSQL re-checks the condition after
  waiting for the other writer; SQLite runs writers one at a time, across processes). Each claim
  adds one to `lease_epoch`; results are written under it (store.ResultChunks).
- Renew extends `lease_expires_at` only `WHERE lease_token = :token`, and returns the status, which
  is how a cancel made through any process reaches the one running the batch.
- Lease expiry is judged by the database's clock alone, so servers' clocks need not agree.

Data of earlier releases is moved in at start-up (upgrade.py).
"""

import time
import uuid
from collections.abc import Callable

from sqlalchemy import ColumnElement, Executable, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..domain.lifecycle import RUNNING_STATUSES, UNFINISHED_STATUSES
from ..domain.ownership import scope_of
from ..domain.records import StoredBatch
from ..domain.webhook_events import event_type_for, new_event_id
from ..stack import BatchNotFoundError, BatchObject, KVStore, SqlStoreReference
from .database import Database, SqlChunks, batch_row, idempotency_ref
from .retention import RetentionStore
from .secrets import SecretBox
from .shards import ShardStore
from .store import BatchPage, BatchStore, Lease, LeaseLostError, RequestIds, ResultChunks
from .upgrade import LegacyUpgrade
from .webhooks import WebhookStore


class SQLBatchStore(BatchStore):
    """Batches, their leases and their results in one SQL database."""

    def __init__(
        self,
        reference: SqlStoreReference,
        kvstore: KVStore | None,
        namespace: str,
        on_move: Callable[[BatchObject, BatchObject], None] | None = None,
    ) -> None:
        """`on_move(before, after)` hears of every committed status change (telemetry.py counts them)."""
        self._db = Database(reference)
        self._on_move = on_move
        self._table = self._db.batches
        chunks = SqlChunks(self._db)
        self.results = ResultChunks(chunks)
        self.request_ids = RequestIds(chunks)
        self.shards = ShardStore(self._db)
        self.retention = RetentionStore(self._db)
        self._upgrade = LegacyUpgrade(kvstore, namespace, self._db) if kvstore is not None else None

    def webhook_store(self, box: SecretBox) -> WebhookStore:
        """Webhook endpoints, events and deliveries, in the same database (events are written with the
        status change that ends a batch)."""
        return WebhookStore(self._db, box)

    async def initialize(self) -> None:
        await self._db.create_tables()
        if self._upgrade is not None:  # no kvstore of an earlier release to read
            await self._upgrade.run()
        await self.close()  # its connections belong to the start-up loop; serving opens new ones

    async def close(self) -> None:
        await self._db.close()

    # --- batches --------------------------------------------------------------------------------

    async def get(self, batch_id: str) -> StoredBatch | None:
        rows = await self._db.read(select(self._table.c.record).where(self._table.c.id == batch_id))
        if not rows:
            return None
        [stored] = await self._with_progress([StoredBatch.model_validate_json(rows[0].record)])
        return stored

    async def _with_progress(self, batches: list[StoredBatch]) -> list[StoredBatch]:
        """The batches with the counts and usage of running ones summed from their shards (shards.py)."""
        running = [stored.batch.id for stored in batches if stored.batch.status in RUNNING_STATUSES]
        progress = await self.shards.progress(running)
        for stored in batches:
            if (tally := progress.get(stored.batch.id)) is not None and stored.batch.request_counts is not None:
                counts = tally.counts(stored.batch.request_counts.total)
                stored.batch = stored.batch.model_copy(update={"request_counts": counts, "usage": tally.usage()})
        return batches

    async def create(
        self, stored: StoredBatch, claim_for: str | None = None, lease_seconds: float = 0.0
    ) -> tuple[StoredBatch, Lease | None]:
        row, lease = batch_row(stored, time.time_ns()), None
        if claim_for is not None:
            lease = Lease(stored.batch.id, uuid.uuid4().hex, epoch=1)
            row |= {"lease_token": lease.token, "lease_holder": claim_for, "lease_epoch": lease.epoch}
            row["lease_expires_at"] = self._db.now() + lease_seconds
        try:
            await self._db.write(self._table.insert().values(**row))
            return stored, lease
        except IntegrityError:
            if stored.idempotency_key is None:
                raise
        # Another create with the same key got in first: its batch is the answer.
        ref = idempotency_ref(scope_of(stored.owner), stored.idempotency_key)
        rows = await self._db.read(select(self._table.c.record).where(self._table.c.idempotency_ref == ref))
        if not rows:  # the integrity error was not about the key after all
            raise RuntimeError(f"Cannot store batch {stored.batch.id!r}")
        return StoredBatch.model_validate_json(rows[0].record), None

    async def update_record(
        self, batch_id: str, change: Callable[[StoredBatch], StoredBatch], lease: Lease | None = None
    ) -> StoredBatch:
        table = self._table
        while True:
            found = await self._db.read(
                select(table.c.record, table.c.version, table.c.lease_token).where(table.c.id == batch_id)
            )
            if not found:
                raise BatchNotFoundError(batch_id)
            row = found[0]
            if lease is not None and row.lease_token != lease.token:
                raise LeaseLostError(batch_id)
            stored = StoredBatch.model_validate_json(row.record)
            changed = change(stored)
            if changed == stored:
                return stored
            conditions = [table.c.id == batch_id, table.c.version == row.version]
            if lease is not None:
                conditions.append(table.c.lease_token == lease.token)
            values = {"record": changed.model_dump_json(), "status": changed.batch.status, "version": row.version + 1}
            move = update(table).where(*conditions).values(**values)
            if (await self._db.write_if(move, *self._events_of(stored, changed))).rowcount == 1:
                if self._on_move is not None and changed.batch.status != stored.batch.status:
                    self._on_move(stored.batch, changed.batch)
                return changed
            # Somebody wrote in between: compute the change again from what they wrote.

    def _events_of(self, before: StoredBatch, after: StoredBatch) -> list[Executable]:
        """What a status change that ends a batch writes with the change itself: its webhook event (no
        crash can lose it, nor send it for a batch that did not end) and the time it ended."""
        event_type = event_type_for(after.batch.status) if after.batch.status != before.batch.status else None
        if event_type is None:
            return []
        now = time.time()
        event = {
            "id": new_event_id(),
            "batch_id": after.batch.id,
            "scope": scope_of(after.owner),
            "type": event_type,
            "created_at": int(now),
        }
        # And when it ended, from which its record's retention counts (retention.py).
        ended = self._db.insert(self._db.ended).values(batch_id=after.batch.id, ended_at=now).on_conflict_do_nothing()
        return [self._db.events.insert().values(**event), ended]

    async def page(self, scope: str, after: str | None, limit: int) -> BatchPage | None:
        table = self._table
        query = select(table.c.record).where(table.c.scope == scope)
        if after is not None:
            found = await self._db.read(select(table.c.created_ns).where(table.c.id == after, table.c.scope == scope))
            if not found:
                return None
            cursor = found[0].created_ns
            older = or_(table.c.created_ns < cursor, and_(table.c.created_ns == cursor, table.c.id < after))
            query = query.where(older)
        rows = await self._db.read(query.order_by(table.c.created_ns.desc(), table.c.id.desc()).limit(limit + 1))
        batches = await self._with_progress([StoredBatch.model_validate_json(row.record) for row in rows[:limit]])
        return BatchPage(batches, has_more=len(rows) > limit)

    async def find_by_key(self, scope: str, key: str) -> StoredBatch | None:
        table = self._table
        rows = await self._db.read(select(table.c.record).where(table.c.idempotency_ref == idempotency_ref(scope, key)))
        return StoredBatch.model_validate_json(rows[0].record) if rows else None

    async def active_work(self, scope: str) -> tuple[int, int]:
        table = self._table
        mine = and_(table.c.scope == scope, table.c.status.in_(UNFINISHED_STATUSES))
        [(batches,)] = await self._db.read(select(func.count()).select_from(table).where(mine))
        validating = await self._db.read(select(table.c.record).where(mine, table.c.status == "validating"))
        counted = sum(StoredBatch.model_validate_json(row.record).request_lines or 0 for row in validating)
        return batches, counted + await self.shards.requests_left(scope)

    # --- leases ---------------------------------------------------------------------------------

    def _claimable(self) -> ColumnElement[bool]:
        table = self._table
        nobody_holds = or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at < self._db.now())
        return and_(table.c.status.in_(UNFINISHED_STATUSES), nobody_holds)

    async def claim(self, holder: str, count: int, lease_seconds: float, newcomers_only: bool = False) -> list[Lease]:
        leases: list[Lease] = []
        while len(leases) < count:
            candidates = await self._claim_order(count - len(leases), holder if newcomers_only else None)
            if not candidates:
                break
            for batch_id in candidates:
                if lease := await self.claim_batch(batch_id, holder, lease_seconds):
                    leases.append(lease)
            # Candidates other servers took meanwhile are held now: the next query skips them.
        return leases

    async def _claim_order(self, count: int, not_running_on: str | None = None) -> list[str]:
        """Up to `count` waiting batches in the order claims take them: an owner's n-th oldest waiting
        batch gets turn n plus the number of batches of that owner someone holds now, lowest turn
        first (then oldest). So owners take turns, and one with many batches running, here or on any
        other replica, comes after one with none: nobody's hundred batches fill every replica first.
        With `not_running_on`, only owners none of whose batches that server holds."""
        table = self._table
        now = self._db.now()
        held_now = and_(table.c.status.in_(UNFINISHED_STATUSES), table.c.lease_expires_at >= now)
        held = select(table.c.scope, func.count().label("batches")).where(held_now).group_by(table.c.scope).subquery()
        nth = func.row_number().over(partition_by=table.c.scope, order_by=table.c.created_ns)
        turn = (func.coalesce(held.c.batches, 0) + nth).label("turn")
        waiting = (
            select(table.c.id, table.c.created_ns, turn)
            .select_from(table.outerjoin(held, held.c.scope == table.c.scope))
            .where(self._claimable())
        )
        if not_running_on is not None:
            running_there = select(table.c.scope).where(held_now, table.c.lease_holder == not_running_on)
            waiting = waiting.where(table.c.scope.not_in(running_there))
        turns = waiting.subquery()
        rows = await self._db.read(select(turns.c.id).order_by(turns.c.turn, turns.c.created_ns).limit(count))
        return [row.id for row in rows]

    async def unfinished_by_status(self) -> dict[str, int]:
        table = self._table
        unfinished = table.c.status.in_(UNFINISHED_STATUSES)  # through the status index: finished ones are not read
        rows = await self._db.read(select(table.c.status, func.count()).where(unfinished).group_by(table.c.status))
        return {status: 0 for status in UNFINISHED_STATUSES} | {row[0]: row[1] for row in rows}

    async def waiting_ids(self, count: int) -> list[str]:
        table = self._table
        oldest_first = select(table.c.id).where(self._claimable()).order_by(table.c.created_ns).limit(count)
        rows = await self._db.read(oldest_first)
        return [row.id for row in rows]

    async def claim_batch(self, batch_id: str, holder: str, lease_seconds: float) -> Lease | None:
        table = self._table
        token = uuid.uuid4().hex
        take = (
            update(table)
            .where(table.c.id == batch_id, self._claimable())
            .values(
                lease_token=token,
                lease_holder=holder,
                lease_epoch=table.c.lease_epoch + 1,
                lease_expires_at=self._db.now() + lease_seconds,
            )
            .returning(table.c.lease_epoch)
        )
        taken = (await self._db.write(take)).rows
        return Lease(batch_id, token, taken[0].lease_epoch) if taken else None

    async def renew(self, lease: Lease, lease_seconds: float) -> str | None:
        table = self._table
        extend = (
            update(table)
            .where(table.c.id == lease.batch_id, table.c.lease_token == lease.token)
            .values(lease_expires_at=self._db.now() + lease_seconds)
            .returning(table.c.status)
        )
        extended = (await self._db.write(extend)).rows
        return extended[0].status if extended else None

    async def release(self, lease: Lease) -> None:
        table = self._table
        give_up = (
            update(table)
            .where(table.c.id == lease.batch_id, table.c.lease_token == lease.token)
            .values(lease_token=None, lease_expires_at=None)  # the holder's name stays, for the record
        )
        await self._db.write(give_up)
