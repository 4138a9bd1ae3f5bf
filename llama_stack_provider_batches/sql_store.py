"""The replicas connector: batch records and leases in a SQL database that several servers share.

One table (named by `sql_store.table_name`) holds a row per batch:

    id                 the batch id (primary key)
    scope, created_ns  whose batch it is, and when it was created (by its server's clock): the list order
    idempotency_ref    "<scope>/<sha256(key)>" for a batch created with an idempotency key (unique)
    status             the batch's status, kept equal to the record's: what claims look at
    record, version    the StoredBatch JSON, and how many times it has been written
    lease_token, lease_epoch, lease_expires_at   the lease (store.py); no token: nobody holds it
    lease_holder       the server holding the lease, or that held it last

Every guarantee rests on the database making single statements atomic, never on timing:

- Create is one INSERT. The unique `idempotency_ref` lets one of any number of concurrent creates
  with the same key in; the others get an integrity error and read the winner's row. A batch
  that must run where it was created (engine.py) is inserted with its lease already taken.
- Updates are compare-and-set on `version`: read the row, compute the change, then
  `UPDATE ... WHERE id = :id AND version = :read_version`; a concurrent writer makes it match no
  row, and the update is computed again from the new row. A job's updates also require
  `lease_token = :its_token`, so a job whose lease was taken over cannot write (LeaseLostError).
- Claim is `UPDATE ... SET lease_token = :new WHERE id = :id AND <nobody holds it>`: of concurrent
  claimers, the database lets exactly one change the row (PostgreSQL re-checks the condition after
  waiting for the other writer; SQLite runs writers one at a time). Each claim adds one to
  `lease_epoch`.
- Renew extends `lease_expires_at` only `WHERE lease_token = :token`, and returns the status, which
  is how a cancel made through any replica reaches the one running the batch.
- Lease expiry is judged by the database's clock alone, so servers' clocks need not agree.

A deployment that ran one server without `sql_store` has its batches in the kvstore (kv_store.py).
At start-up the unfinished ones are copied into the table and taken off the kvstore's work queue
(a replica whose insert finds the row there already just does the latter), so they run on; their
results so far are epoch 0's. Finished ones stay
where they are and are still found by id (`get`), but not listed.

The stack's SqlStore interface cannot say how many rows an update matched, which compare-and-set
needs, so this module runs its statements with SQLAlchemy (the stack's own SQL layer) on an engine
of its own, built from the stack's backend named by `sql_store.backend`.
"""

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from llama_stack.core.storage.datatypes import SqlAlchemySqlStoreConfig, SqlStoreReference
from llama_stack.core.storage.sqlstore.sqlstore import sqlstore_impl
from llama_stack_api import BatchNotFoundError
from llama_stack_api.internal.kvstore import KVStore
from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    cast,
    event,
    extract,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .kv_store import KVBatchStore
from .ownership import scope_of
from .store import (
    LAYOUT_VERSION,
    UNFINISHED_STATUSES,
    BatchPage,
    BatchStore,
    Lease,
    LeaseLostError,
    RequestIds,
    ResultChunks,
    StoredBatch,
)


def batches_table(name: str) -> Table:
    """The table's schema (created if missing at start-up)."""
    table = Table(
        name,
        MetaData(),
        Column("id", String(64), primary_key=True),
        Column("scope", String(64), nullable=False),
        Column("created_ns", BigInteger, nullable=False),
        Column("idempotency_ref", String(128), nullable=True, unique=True),
        Column("status", String(32), nullable=False),
        Column("record", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("lease_token", String(64), nullable=True),
        Column("lease_holder", String(256), nullable=True),
        Column("lease_epoch", Integer, nullable=False, default=0),
        Column("lease_expires_at", Float, nullable=True),
    )
    Index(f"{name}_by_scope", table.c.scope, table.c.created_ns)
    Index(f"{name}_by_status", table.c.status, table.c.created_ns)
    return table


def idempotency_ref(scope: str, key: str) -> str:
    return f"{scope}/{hashlib.sha256(key.encode()).hexdigest()}"


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    # WAL lets readers run beside the one writer; busy_timeout makes a writer wait for the lock.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class SQLBatchStore(BatchStore):
    """Batches in a shared SQL table, results in the kvstore."""

    def __init__(self, reference: SqlStoreReference, kvstore: KVStore, namespace: str) -> None:
        backend = sqlstore_impl(reference)
        config = getattr(backend, "config", None)
        if not isinstance(config, SqlAlchemySqlStoreConfig):
            raise ValueError(f"The batches sql_store backend {reference.backend!r} is not a SQLite or PostgreSQL one.")
        self._url = config.engine_str
        self._table = batches_table(reference.table_name)
        self._engine: AsyncEngine | None = None
        self._engine_loop: asyncio.AbstractEventLoop | None = None
        self.results = ResultChunks(kvstore, f"{namespace}/v{LAYOUT_VERSION}/")
        self.request_ids = RequestIds(kvstore, f"{namespace}/v{LAYOUT_VERSION}/")
        self._single_server = KVBatchStore(kvstore, namespace)  # batches stored before `sql_store` was set

    # --- connections ----------------------------------------------------------------------------

    def _connect(self) -> AsyncEngine:
        """The engine of the running event loop (the stack starts providers in a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._engine is None or self._engine_loop is not loop:
            sqlite = self._url.startswith("sqlite")
            engine = create_async_engine(self._url, pool_pre_ping=True, connect_args={"timeout": 5.0} if sqlite else {})
            if sqlite:
                event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            self._engine, self._engine_loop = engine, loop
        return self._engine

    def _now(self) -> ColumnElement[Any]:
        """The database's clock, in seconds since the epoch."""
        if self._url.startswith("postgresql"):
            return cast(extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - 2440587.5) * 86400.0

    async def initialize(self) -> None:
        engine = self._connect()
        async with engine.begin() as connection:
            await connection.run_sync(self._table.metadata.create_all, checkfirst=True)
        await self._take_over_single_server_batches()
        await self.close()  # its connections belong to the start-up loop; serving opens new ones

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # --- batches --------------------------------------------------------------------------------

    async def get(self, batch_id: str) -> StoredBatch | None:
        table = self._table
        async with self._connect().connect() as connection:
            record = await connection.scalar(select(table.c.record).where(table.c.id == batch_id))
        if record is None:
            return await self._single_server.get(batch_id)
        return StoredBatch.model_validate_json(record)

    async def _take_over_single_server_batches(self) -> None:
        """Copy the unfinished batches a single server left in the kvstore into the table, and take
        them off its work queue, so that later starts find nothing to do."""
        for batch_id in await self._single_server.active_ids():
            stored = await self._single_server.get(batch_id)
            if stored is not None and stored.batch.status in UNFINISHED_STATUSES:
                position = stored.index_position.slot if stored.index_position else 0
                with contextlib.suppress(IntegrityError):  # copied already, by another replica
                    await self._insert(stored, stored.batch.created_at * 10**9 + position)
            await self._single_server.retire(batch_id)

    async def create(
        self, stored: StoredBatch, claim_for: str | None = None, lease_seconds: float = 0.0
    ) -> tuple[StoredBatch, Lease | None]:
        lease, lease_columns = None, {}
        if claim_for is not None:
            lease = Lease(stored.batch.id, uuid.uuid4().hex, epoch=1)
            lease_columns = {"lease_token": lease.token, "lease_holder": claim_for, "lease_epoch": lease.epoch}
            lease_columns["lease_expires_at"] = self._now() + lease_seconds
        try:
            await self._insert(stored, time.time_ns(), lease_columns)
            return stored, lease
        except IntegrityError:
            if stored.idempotency_key is None:
                raise
        # Another create with the same key got in first: its batch is the answer.
        ref = idempotency_ref(scope_of(stored.owner), stored.idempotency_key)
        async with self._connect().connect() as connection:
            record = await connection.scalar(select(self._table.c.record).where(self._table.c.idempotency_ref == ref))
        if record is None:  # the integrity error was not about the key after all
            raise RuntimeError(f"Cannot store batch {stored.batch.id!r}")
        return StoredBatch.model_validate_json(record), None

    async def _insert(self, stored: StoredBatch, created_ns: int, lease_columns: dict[str, Any] | None = None) -> None:
        """Insert a batch's row; IntegrityError if its id or idempotency key is taken."""
        scope = scope_of(stored.owner)
        key = stored.idempotency_key
        row = {
            "id": stored.batch.id,
            "scope": scope,
            "created_ns": created_ns,
            "idempotency_ref": idempotency_ref(scope, key) if key is not None else None,
            "status": stored.batch.status,
            "record": stored.model_dump_json(),
            "version": 1,
            "lease_epoch": 0,
            **(lease_columns or {}),
        }
        async with self._connect().begin() as connection:
            await connection.execute(self._table.insert().values(**row))

    async def update_record(
        self, batch_id: str, change: Callable[[StoredBatch], StoredBatch], lease: Lease | None = None
    ) -> StoredBatch:
        table = self._table
        while True:
            async with self._connect().connect() as connection:
                found = await connection.execute(
                    select(table.c.record, table.c.version, table.c.lease_token).where(table.c.id == batch_id)
                )
                row = found.first()
            if row is None:
                raise BatchNotFoundError(batch_id)
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
            async with self._connect().begin() as connection:
                written = await connection.execute(update(table).where(*conditions).values(**values))
            if written.rowcount == 1:
                return changed
            # Somebody wrote in between: compute the change again from what they wrote.

    async def page(self, scope: str, after: str | None, limit: int) -> BatchPage | None:
        table = self._table
        query = select(table.c.record).where(table.c.scope == scope)
        async with self._connect().connect() as connection:
            if after is not None:
                found = await connection.execute(
                    select(table.c.created_ns).where(table.c.id == after, table.c.scope == scope)
                )
                cursor = found.first()
                if cursor is None:
                    return None
                older = or_(
                    table.c.created_ns < cursor.created_ns,
                    and_(table.c.created_ns == cursor.created_ns, table.c.id < after),
                )
                query = query.where(older)
            query = query.order_by(table.c.created_ns.desc(), table.c.id.desc()).limit(limit + 1)
            records = list((await connection.scalars(query)).all())
        batches = [StoredBatch.model_validate_json(record) for record in records[:limit]]
        return BatchPage(batches, has_more=len(records) > limit)

    # --- leases ---------------------------------------------------------------------------------

    def _claimable(self) -> ColumnElement[bool]:
        table = self._table
        nobody_holds = or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at < self._now())
        return and_(table.c.status.in_(UNFINISHED_STATUSES), nobody_holds)

    async def claim(self, holder: str, count: int, lease_seconds: float) -> list[Lease]:
        leases: list[Lease] = []
        while len(leases) < count:
            candidates = await self._claimable_ids(count - len(leases))
            if not candidates:
                break
            for batch_id in candidates:
                if lease := await self._take(batch_id, holder, lease_seconds):
                    leases.append(lease)
            # Candidates other servers took meanwhile are held now: the next query skips them.
        return leases

    async def _claimable_ids(self, count: int) -> list[str]:
        table = self._table
        query = select(table.c.id).where(self._claimable()).order_by(table.c.created_ns).limit(count)
        async with self._connect().connect() as connection:
            return list((await connection.scalars(query)).all())

    async def claim_batch(self, batch_id: str, holder: str, lease_seconds: float) -> Lease | None:
        return await self._take(batch_id, holder, lease_seconds)

    async def waiting_ids(self, count: int) -> list[str]:
        return await self._claimable_ids(count)

    async def _take(self, batch_id: str, holder: str, lease_seconds: float) -> Lease | None:
        """The lease of one batch if nobody holds it; None if another server took it first."""
        table = self._table
        token = uuid.uuid4().hex
        take = (
            update(table)
            .where(table.c.id == batch_id, self._claimable())
            .values(
                lease_token=token,
                lease_holder=holder,
                lease_epoch=table.c.lease_epoch + 1,
                lease_expires_at=self._now() + lease_seconds,
            )
            .returning(table.c.lease_epoch)
        )
        async with self._connect().begin() as connection:
            epoch = (await connection.execute(take)).scalar()
        return None if epoch is None else Lease(batch_id, token, epoch)

    async def renew(self, lease: Lease, lease_seconds: float) -> str | None:
        table = self._table
        extend = (
            update(table)
            .where(table.c.id == lease.batch_id, table.c.lease_token == lease.token)
            .values(lease_expires_at=self._now() + lease_seconds)
            .returning(table.c.status)
        )
        async with self._connect().begin() as connection:
            return (await connection.execute(extend)).scalar()

    async def release(self, lease: Lease) -> None:
        table = self._table
        give_up = (
            update(table)
            .where(table.c.id == lease.batch_id, table.c.lease_token == lease.token)
            .values(lease_token=None, lease_expires_at=None)  # the holder's name stays, for the record
        )
        async with self._connect().begin() as connection:
            await connection.execute(give_up)

    async def retire(self, batch_id: str) -> None:
        """Nothing to do: a terminal status takes a batch out of every claim."""
