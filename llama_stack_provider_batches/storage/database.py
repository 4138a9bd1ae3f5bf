"""The SQL database that holds everything the provider stores: its tables, its connections, its clock.

Tables named after `sql_store.table_name` (`batches` unless set):

    <name>          one row per batch: its record, list order, idempotency key, status and lease (sql_store.py)
    <name>_shards   one row per range of a running batch's requests: its lease and progress (shards.py)
    <name>_chunks   key -> text: result chunks and custom_id lists of unfinished batches (store.py)
    <name>_webhook_endpoints, <name>_events, <name>_deliveries   webhooks (webhooks.py)
    <name>_ended, <name>_file_expiries   when batches ended and when their result files expire (retention.py)

The database is the stack's `sql_default` backend unless configured otherwise: SQLite on one host
(every worker process of a server, and every server on that host, shares the file safely) or
PostgreSQL across hosts. Statements run with SQLAlchemy, the stack's own SQL layer, on an engine of
this provider's own, because compare-and-set needs the number of rows an update matched, which the
stack's SqlStore interface does not report.
"""

import asyncio
import hashlib
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Executable,
    Float,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    exists,
    extract,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError

from ..domain.ownership import scope_of
from ..domain.records import StoredBatch
from ..stack import SqlStoreReference, sql_engine_url
from .connections import Written, connections_to

CREATE_ATTEMPTS = 5  # worker processes starting together race to create the tables
STATEMENT_DRAIN_SECONDS = 5.0  # at close, how long statements under way may still finish


def lease_columns() -> list[Column[Any]]:
    """A lease (of a batch or a shard): its token (none: nobody holds it), holder, epoch and expiry."""
    return [
        Column("lease_token", String(64), nullable=True),
        Column("lease_holder", String(256), nullable=True),
        Column("lease_epoch", Integer, nullable=False, default=0),
        Column("lease_expires_at", Float, nullable=True),
    ]


def define_tables(name: str) -> tuple[Table, Table, Table]:
    """The batches, shards and chunks tables (created if missing at start-up)."""
    metadata = MetaData()
    batches = Table(
        name,
        metadata,
        Column("id", String(64), primary_key=True),
        Column("scope", String(64), nullable=False),
        Column("created_ns", BigInteger, nullable=False),
        Column("idempotency_ref", String(128), nullable=True, unique=True),
        Column("status", String(32), nullable=False),
        Column("record", Text, nullable=False),
        Column("version", Integer, nullable=False),
        *lease_columns(),
    )
    Index(f"{name}_by_scope", batches.c.scope, batches.c.created_ns)
    Index(f"{name}_by_status", batches.c.status, batches.c.created_ns)
    shards = Table(
        f"{name}_shards",
        metadata,
        Column("batch_id", String(64), primary_key=True),
        Column("shard", Integer, primary_key=True),
        Column("first", Integer, nullable=False),
        Column("end", Integer, nullable=False),
        Column("batch_created_ns", BigInteger, nullable=False),
        Column("shareable", Boolean, nullable=False),  # False: only the batch's own job may run it
        Column("expires_at", Float, nullable=True),  # the batch's: no shard is claimed after it
        Column("done", Boolean, nullable=False, default=False),
        *lease_columns(),
        Column("completed", Integer, nullable=False, default=0),
        Column("failed", Integer, nullable=False, default=0),
        Column("input_tokens", BigInteger, nullable=False, default=0),
        Column("output_tokens", BigInteger, nullable=False, default=0),
    )
    Index(f"{name}_shards_open", shards.c.done, shards.c.batch_created_ns)
    chunks = Table(
        f"{name}_chunks",
        metadata,
        Column("key", String(256), primary_key=True),
        Column("value", Text, nullable=False),
    )
    return batches, shards, chunks


def define_webhook_tables(metadata: MetaData, name: str) -> tuple[Table, Table, Table, Table]:
    """Webhook endpoints, their secrets' hints, events waiting to be fanned out to them, and deliveries
    (storage/webhooks.py)."""
    endpoints = Table(
        f"{name}_webhook_endpoints",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("scope", String(64), nullable=False),
        Column("created_ns", BigInteger, nullable=False),
        Column("owner", Text, nullable=True),  # ownership.Owner as JSON; none with authentication off
        Column("name", String(256), nullable=False),
        Column("url", Text, nullable=False),
        Column("event_types", Text, nullable=False),  # a JSON list
        Column("secret", Text, nullable=False),  # sealed (secrets.py)
        Column("previous_secret", Text, nullable=True),  # sealed, honoured until previous_until
        Column("previous_until", Float, nullable=True),
        Column("created_at", BigInteger, nullable=False),
        Column("updated_at", BigInteger, nullable=False),
    )
    Index(f"{name}_webhook_endpoints_by_scope", endpoints.c.scope, endpoints.c.created_ns)
    hints = Table(  # a table of its own: endpoints stored before it existed have no row (computed then)
        f"{name}_webhook_hints",
        metadata,
        Column("endpoint_id", String(64), primary_key=True),
        Column("hint", String(64), nullable=False),  # signing_secret_hint: read without opening the secret
    )
    events = Table(  # written in the transaction that ends a batch; removed once fanned out
        f"{name}_events",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("batch_id", String(64), nullable=False),
        Column("scope", String(64), nullable=False),
        Column("type", String(64), nullable=False),
        Column("created_at", BigInteger, nullable=False),
    )
    deliveries = Table(
        f"{name}_deliveries",
        metadata,
        Column("event_id", String(64), primary_key=True),
        Column("endpoint_id", String(64), primary_key=True),
        Column("type", String(64), nullable=False),
        Column("batch_id", String(64), nullable=False),
        Column("event_created_at", BigInteger, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", Float, nullable=False),  # the database's clock
        Column("last_error", Text, nullable=True),
        *lease_columns(),
    )
    Index(f"{name}_deliveries_due", deliveries.c.next_attempt_at)
    return endpoints, hints, events, deliveries


def define_retention_tables(metadata: MetaData, name: str) -> tuple[Table, Table]:
    """When each batch ended (for its record's retention), and when its result files expire (retention.py)."""
    ended = Table(
        f"{name}_ended",
        metadata,
        Column("batch_id", String(64), primary_key=True),
        Column("ended_at", Float, nullable=False),  # epoch seconds, written with the move that ended it
    )
    Index(f"{name}_ended_by_time", ended.c.ended_at)
    file_expiries = Table(
        f"{name}_file_expiries",
        metadata,
        Column("file_id", String(128), primary_key=True),
        Column("batch_id", String(64), nullable=False),
        Column("owner", Text, nullable=True),  # whose file: it is deleted with that user's rights
        Column("expires_at", Float, nullable=False),
    )
    Index(f"{name}_file_expiries_due", file_expiries.c.expires_at)
    return ended, file_expiries


def define_token_table(metadata: MetaData, name: str) -> Table:
    """Each shard's estimated input tokens, by model (token_quota.py), written with the shards when a
    token limit is set and dropped with them."""
    return Table(
        f"{name}_shard_tokens",
        metadata,
        Column("batch_id", String(64), primary_key=True),
        Column("shard", Integer, primary_key=True),
        Column("model", Text, primary_key=True),
        Column("tokens", BigInteger, nullable=False),
    )


def idempotency_ref(scope: str, key: str) -> str:
    """The unique `idempotency_ref` of a batch created with key `key` in an owner's scope."""
    return f"{scope}/{hashlib.sha256(key.encode()).hexdigest()}"


def batch_row(stored: StoredBatch, created_ns: int) -> dict[str, Any]:
    """The row of a new batch that nobody holds a lease on."""
    scope = scope_of(stored.owner)
    key = stored.idempotency_key
    return {
        "id": stored.batch.id,
        "scope": scope,
        "created_ns": created_ns,
        "idempotency_ref": idempotency_ref(scope, key) if key is not None else None,
        "status": stored.batch.status,
        "record": stored.model_dump_json(),
        "version": 1,
        "lease_epoch": 0,
    }


class Database:
    """The provider's SQL database: its tables, and statements each run in a transaction of its own."""

    def __init__(self, reference: SqlStoreReference) -> None:
        self.url = make_url(sql_engine_url(reference))
        self.batches, self.shards, self.chunks = define_tables(reference.table_name)
        webhook_tables = define_webhook_tables(self.batches.metadata, reference.table_name)
        self.endpoints, self.webhook_hints, self.events, self.deliveries = webhook_tables
        self.ended, self.file_expiries = define_retention_tables(self.batches.metadata, reference.table_name)
        self.shard_tokens = define_token_table(self.batches.metadata, reference.table_name)
        self._connections = connections_to(self.url)
        self._statements: set[asyncio.Task[Any]] = set()

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT of this database's dialect, which has `on_conflict_do_nothing` and `_do_update`."""
        return (postgresql if self.is_postgres else sqlite).insert(table)

    def now(self) -> ColumnElement[Any]:
        """The database's clock, in seconds since the epoch: leases never depend on servers' clocks."""
        if self.is_postgres:
            return cast(extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - 2440587.5) * 86400.0

    async def create_tables(self) -> None:
        """Create the tables that are missing; another process creating them at the same time is fine."""
        for attempt in range(CREATE_ATTEMPTS):
            try:
                await self._connections.create_all(self.batches.metadata)
                return
            except DatabaseError:
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def read(self, statement: Executable) -> list[Row[Any]]:
        """The rows a query returns."""
        return await self._uncancelled(self._connections.read(statement))

    async def write(self, statement: Executable, parameters: dict[str, Any] | None = None) -> Written:
        """Run one statement (with its bound `parameters`, if any) in a transaction of its own."""
        return await self._uncancelled(self._connections.write_if(statement, (), parameters))

    async def write_if(self, first: Executable, *then: Executable) -> Written:
        """Run `first`, and `then` only if it matched a row, in one transaction: together or not at all."""
        return await self._uncancelled(self._connections.write_if(first, then))

    async def write_checked(
        self, writes: tuple[Executable, ...], check: Executable, keep: Callable[[list[Row[Any]]], bool]
    ) -> list[Row[Any]]:
        """Run `writes`, then the query `check`, in one transaction, committed only if `keep` accepts the
        check's rows (which are returned either way). The first write takes SQLite's write lock, so the
        checks of concurrent transactions see each other's writes; on PostgreSQL, make the first write
        a lock on what the check reads (advisory_lock)."""
        return await self._uncancelled(self._connections.write_checked(writes, check, keep))

    def advisory_lock(self, name: str) -> Executable | None:
        """On PostgreSQL, a statement that holds a lock on `name` until its transaction ends; None on SQLite,
        where a transaction's first write already excludes every other writer."""
        if not self.is_postgres:
            return None
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        return select(func.pg_advisory_xact_lock(key))

    async def _uncancelled[T](self, work: Coroutine[Any, Any, T]) -> T:
        # A statement cancelled half-way (a caller's timeout) can leave its connection inside an open
        # transaction, holding SQLite's write lock from every other process: statements always finish,
        # and a cancelled caller just stops waiting for the answer.
        task = asyncio.ensure_future(work)
        self._statements.add(task)
        task.add_done_callback(self._statements.discard)
        return await asyncio.shield(task)

    async def close(self) -> None:
        if self._statements:
            await asyncio.wait(set(self._statements), timeout=STATEMENT_DRAIN_SECONDS)
        await self._connections.close()


class SqlChunks:
    """Key-value access to the chunks table, as store.ResultChunks and store.RequestIds use it."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._upsert_while_held = self._build_upsert_while_held()

    async def get(self, key: str) -> str | None:
        table = self._db.chunks
        rows = await self._db.read(select(table.c.value).where(table.c.key == key))
        return rows[0].value if rows else None

    async def get_many(self, keys: list[str]) -> dict[str, str]:
        """The values of those of `keys` that are stored."""
        table = self._db.chunks
        rows = await self._db.read(select(table.c.key, table.c.value).where(table.c.key.in_(keys)))
        return {row.key: row.value for row in rows}

    async def set(self, key: str, value: str) -> None:
        """Write `value` under `key`, replacing what is there."""
        table = self._db.chunks
        insert = self._db.insert(table).values(key=key, value=value)
        upsert = insert.on_conflict_do_update(index_elements=[table.c.key], set_={"value": insert.excluded.value})
        await self._db.write(upsert)

    async def set_while_held(self, key: str, value: str, batch_id: str, shard: int, token: str) -> bool:
        """Write `value` under `key` as `set` does, in the same statement as checking that lease `token`
        holds shard `shard` of `batch_id`; False, writing nothing, if it does not."""
        parameters = {"key": key, "value": value, "batch_id": batch_id, "shard": shard, "token": token}
        return (await self._db.write(self._upsert_while_held, parameters)).rowcount > 0

    def _build_upsert_while_held(self) -> Executable:
        # Built once, with bound parameters: a result write is the hottest statement, and building
        # and compiling the expression for each one was most of its cost in Python.
        table, shards = self._db.chunks, self._db.shards
        lease_holds = exists().where(
            shards.c.batch_id == bindparam("batch_id"),
            shards.c.shard == bindparam("shard"),
            shards.c.lease_token == bindparam("token"),
        )
        held = select(bindparam("key", type_=String()), bindparam("value", type_=Text())).where(lease_holds)
        insert = self._db.insert(table).from_select(["key", "value"], held)
        return insert.on_conflict_do_update(index_elements=[table.c.key], set_={"value": insert.excluded.value})

    async def delete_under(self, prefix: str) -> None:
        """Delete every key that starts with `prefix`."""
        table = self._db.chunks
        await self._db.write(delete(table).where(table.c.key.like(like_prefix(prefix), escape="\\")))

    async def keys_under(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`."""
        table = self._db.chunks
        rows = await self._db.read(select(table.c.key).where(table.c.key.like(like_prefix(prefix), escape="\\")))
        return [row.key for row in rows]

    async def keys_between(self, low: str, high: str) -> list[str]:
        """Every key from `low` (included) to `high` (excluded). In the database's collation: callers rely
        on keys of a fixed shape (a fixed-length batch id, then "/"), which every collation orders alike."""
        table = self._db.chunks
        rows = await self._db.read(select(table.c.key).where(table.c.key >= low, table.c.key < high))
        return [row.key for row in rows]


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching what starts with `prefix` (batch ids hold `_`, a LIKE wildcard)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
