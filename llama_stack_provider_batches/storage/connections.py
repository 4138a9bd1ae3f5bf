"""How statements reach the database: one transaction at a time, on PostgreSQL or SQLite.

PostgreSQL runs on SQLAlchemy's asyncio engine (asyncpg). SQLite runs on SQLAlchemy's synchronous
engine, one whole transaction per call in a thread of this provider's: through aiosqlite, every step
of a transaction (checkout, execute, commit, reset) was a hop to its thread and back to the event
loop, and on a loop busy with a batch each hop waited its turn. A result write took 13 ms for five
hops; the dispatcher, which waits while a window of results is unstored, stood still meanwhile.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import URL, Connection, Executable, MetaData, Row, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_THREADS = 8  # transactions at once; SQLite runs one writer at a time, readers beside it (WAL)


@dataclass(frozen=True)
class Written:
    """What a write did: how many rows it matched, and the rows it returned."""

    rowcount: int
    rows: list[Row[Any]]


class Connections(Protocol):
    """Runs statements, each call in a transaction of its own."""

    async def read(self, statement: Executable) -> list[Row[Any]]: ...

    async def write_if(
        self, first: Executable, then: tuple[Executable, ...], parameters: dict[str, Any] | None = None
    ) -> Written: ...

    async def write_checked(
        self, writes: tuple[Executable, ...], check: Executable, keep: Callable[[list[Row[Any]]], bool]
    ) -> list[Row[Any]]: ...

    async def create_all(self, metadata: MetaData) -> None: ...

    async def close(self) -> None: ...


class _Undo(Exception):
    """Rolls a checked write back: its check's rows did not pass."""

    def __init__(self, rows: list[Row[Any]]) -> None:
        self.rows = rows


def connections_to(url: URL) -> Connections:
    """The connections for the database at `url` (a SQLAlchemy URL with an asyncio driver)."""
    if url.get_backend_name() == "sqlite":
        return SqliteConnections(url)
    return AsyncEngineConnections(url)


def _write_if_sync(
    connection: Connection, first: Executable, then: tuple[Executable, ...], parameters: dict[str, Any] | None
) -> Written:
    result = connection.execute(first, parameters)
    rows = list(result.all()) if result.returns_rows else []
    if result.rowcount > 0 or rows:
        for statement in then:
            connection.execute(statement)
    return Written(result.rowcount, rows)


def _write_checked_sync(
    connection: Connection, writes: tuple[Executable, ...], check: Executable, keep: Callable[[list[Row[Any]]], bool]
) -> list[Row[Any]]:
    for statement in writes:
        connection.execute(statement)
    rows = list(connection.execute(check).all())
    if not keep(rows):
        raise _Undo(rows)
    return rows


class AsyncEngineConnections:
    """SQLAlchemy's asyncio engine, made for the running event loop (the stack builds providers in a
    loop of its own, then serves in another)."""

    def __init__(self, url: URL) -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self._engine_loop: asyncio.AbstractEventLoop | None = None

    def _current(self) -> AsyncEngine:
        loop = asyncio.get_running_loop()
        if self._engine is None or self._engine_loop is not loop:
            # Pre-ping finds a connection the server dropped (a restart) before a statement meets it.
            self._engine, self._engine_loop = create_async_engine(self._url, pool_pre_ping=True), loop
        return self._engine

    async def read(self, statement: Executable) -> list[Row[Any]]:
        async with self._current().connect() as connection:
            return list((await connection.execute(statement)).all())

    async def write_if(
        self, first: Executable, then: tuple[Executable, ...], parameters: dict[str, Any] | None = None
    ) -> Written:
        async with self._current().begin() as connection:
            result = await connection.execute(first, parameters)
            rows = list(result.all()) if result.returns_rows else []
            if result.rowcount > 0 or rows:
                for statement in then:
                    await connection.execute(statement)
            return Written(result.rowcount, rows)

    async def write_checked(
        self, writes: tuple[Executable, ...], check: Executable, keep: Callable[[list[Row[Any]]], bool]
    ) -> list[Row[Any]]:
        try:
            async with self._current().begin() as connection:
                return await connection.run_sync(_write_checked_sync, writes, check, keep)
        except _Undo as undo:
            return undo.rows

    async def create_all(self, metadata: MetaData) -> None:
        async with self._current().begin() as connection:
            await connection.run_sync(metadata.create_all, checkfirst=True)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    # WAL lets readers run beside the one writer, across processes too; busy_timeout makes a writer
    # wait for the lock instead of failing at once when another process writes.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at every checkpoint; WAL keeps commits atomic
    cursor.close()


class SqliteConnections:
    """SQLAlchemy's synchronous SQLite engine, each transaction run whole in a thread of its own pool."""

    def __init__(self, url: URL) -> None:
        # The stack names aiosqlite; the same file through the standard library's driver.
        self._engine = create_engine(
            url.set(drivername="sqlite+pysqlite"),
            connect_args={"timeout": 15.0, "check_same_thread": False},
            pool_size=SQLITE_THREADS,
        )
        event.listen(self._engine, "connect", _sqlite_pragmas)
        self._threads: ThreadPoolExecutor | None = None  # made on first use, again after a close

    async def _in_thread[T](self, work: Callable[[], T]) -> T:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=SQLITE_THREADS, thread_name_prefix="batches-sqlite")
        return await asyncio.get_running_loop().run_in_executor(self._threads, work)

    async def read(self, statement: Executable) -> list[Row[Any]]:
        def read() -> list[Row[Any]]:
            with self._engine.connect() as connection:
                return list(connection.execute(statement).all())

        return await self._in_thread(read)

    async def write_if(
        self, first: Executable, then: tuple[Executable, ...], parameters: dict[str, Any] | None = None
    ) -> Written:
        def write() -> Written:
            with self._engine.begin() as connection:
                return _write_if_sync(connection, first, then, parameters)

        return await self._in_thread(write)

    async def write_checked(
        self, writes: tuple[Executable, ...], check: Executable, keep: Callable[[list[Row[Any]]], bool]
    ) -> list[Row[Any]]:
        def write() -> list[Row[Any]]:
            try:
                with self._engine.begin() as connection:
                    return _write_checked_sync(connection, writes, check, keep)
            except _Undo as undo:
                return undo.rows

        return await self._in_thread(write)

    async def create_all(self, metadata: MetaData) -> None:
        await self._in_thread(lambda: metadata.create_all(self._engine, checkfirst=True))

    async def close(self) -> None:
        """Close every connection; the next statement opens new ones."""
        await self._in_thread(self._engine.dispose)
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False)
