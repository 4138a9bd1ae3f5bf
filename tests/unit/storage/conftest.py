"""Two stores over one database (SQLite, then PostgreSQL): what two replicas see."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.unit.backends import SQL_BACKENDS, open_kvstore, sql_reference


@pytest.fixture(params=SQL_BACKENDS)
async def replicas(request, tmp_path: Path) -> AsyncIterator[tuple[SQLBatchStore, SQLBatchStore]]:
    async with open_kvstore("sqlite", tmp_path) as (kvstore, namespace), sql_reference(request.param, tmp_path) as ref:
        first, second = SQLBatchStore(ref, kvstore, namespace), SQLBatchStore(ref, kvstore, namespace)
        await first.initialize()
        await second.initialize()
        yield first, second
        await first.close()
        await second.close()
