"""The storage backends unit tests run against for real: every kvstore and SQL backend that runs
here (SQLite always; PostgreSQL and Redis on 127.0.0.1 when their servers are up)."""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from llama_stack_provider_batches.stack import (
    KVStore,
    KVStoreReference,
    PostgresKVStoreConfig,
    PostgresSqlStoreConfig,
    RedisKVStoreConfig,
    SqliteKVStoreConfig,
    SqliteSqlStoreConfig,
    SqlStoreReference,
    kvstore_impl,
    register_kvstore_backends,
    register_sqlstore_backends,
)
from tools.harness import server_up

PORTS = {"postgres": 5432, "redis": 6379}
KV_BACKENDS = ["sqlite", "postgres", "redis"]
SQL_BACKENDS = ["sqlite", "postgres"]
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def skip_unless_up(name: str) -> None:
    if name in PORTS and not server_up(PORTS[name]):
        pytest.skip(f"no {name} server on 127.0.0.1:{PORTS[name]}")


@asynccontextmanager
async def open_kvstore(name: str, tmp_path: Path) -> AsyncIterator[tuple[KVStore, str]]:
    """A kvstore on backend `name`, and a fresh namespace that keeps earlier data out of the way."""
    skip_unless_up(name)
    configs = {
        "sqlite": SqliteKVStoreConfig(db_path=str(tmp_path / "kv.db")),
        "postgres": PostgresKVStoreConfig(
            host="127.0.0.1", port=5432, db="test", user="postgres", table_name="kv_unit"
        ),
        "redis": RedisKVStoreConfig(host="127.0.0.1", port=6379),
    }
    register_kvstore_backends({"kv_store_test": configs[name]})
    namespace = f"t{uuid.uuid4().hex[:12]}"
    kvstore = await kvstore_impl(KVStoreReference(backend="kv_store_test", namespace=namespace))
    try:
        yield kvstore, namespace
    finally:
        await kvstore.shutdown()


@asynccontextmanager
async def sql_reference(name: str, tmp_path: Path) -> AsyncIterator[SqlStoreReference]:
    """A SQL backend registered as the stack registers it, and a fresh table name (dropped after)."""
    skip_unless_up(name)
    configs = {
        "sqlite": SqliteSqlStoreConfig(db_path=str(tmp_path / "sql.db")),
        "postgres": PostgresSqlStoreConfig(host="127.0.0.1", port=5432, db="test", user="postgres"),
    }
    register_sqlstore_backends({"sql_store_test": configs[name]})
    table = f"batches_{uuid.uuid4().hex[:12]}"
    try:
        yield SqlStoreReference(backend="sql_store_test", table_name=table)
    finally:
        if name == "postgres":
            engine = create_async_engine(POSTGRES_URL)
            async with engine.begin() as connection:
                await connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
            await engine.dispose()
