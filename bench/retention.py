"""After a batch ends: how soon its webhook arrives, and what the retention sweep costs.

    .venv/bin/python bench/retention.py                          # both parts
    .venv/bin/python bench/retention.py --part sweep --batches 100000 --backends sqlite,postgres
    .venv/bin/python bench/retention.py --part webhooks --batches 50

sweep     a store (SQLite in a temporary directory, PostgreSQL on 127.0.0.1:5432 in tables of its own)
          filled with N finished batches as the provider writes them (record, idempotency key, ended
          row); then the sweep (engine/housekeeping.py) when nothing is due, and when all N are past
          their retention. Printed: bytes per batch record, seconds and rows/s, and the serving
          loop's worst lag meanwhile (a 10 ms ticker on the same loop). The built-in provider keeps
          every record forever: it has no sweep to compare with.
webhooks  one stack of run.yaml (127.0.0.1 allowed), an endpoint of a receiver on this machine,
          N small batches one after the other: seconds from each batch's end (its event's
          `created_at`, and the first poll that sees it ended) to the event's arrival. The machine's
          limit is the loop's poll of 1 s for events ended in another process, 0 for this one.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from llama_stack_provider_batches.config import BatchesProviderConfig
from llama_stack_provider_batches.domain.ownership import Owner, scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.engine.housekeeping import Housekeeper
from llama_stack_provider_batches.stack import (
    BatchObject,
    PostgresSqlStoreConfig,
    SqliteSqlStoreConfig,
    SqlStoreReference,
    register_sqlstore_backends,
)
from llama_stack_provider_batches.storage.database import batch_row, idempotency_ref
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tools.harness import StandInControl, start_stack, start_standin, warm_up
from tools.webhook_receiver import WebhookReceiver

INSERT_ROWS = 2000
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def finished_batch(n: int, owner: Owner) -> StoredBatch:
    now = int(time.time())
    batch = BatchObject.model_validate(
        {
            "id": f"batch_{uuid.uuid4().hex}",
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": f"file-{uuid.uuid4().hex}",
            "completion_window": "24h",
            "status": "completed",
            "created_at": now - 100,
            "completed_at": now,
            "expires_at": now + 86400,
            "output_file_id": f"file-{uuid.uuid4().hex}",
            "request_counts": {"total": 1000, "completed": 1000, "failed": 0},
            "metadata": {"job": f"nightly-{n}"},
        }
    )
    return StoredBatch(batch=batch, owner=owner, idempotency_key=f"key-{n}")


async def fill(store: SQLBatchStore, count: int) -> int:
    """Insert `count` finished batches, as the provider writes them; the bytes of one record."""
    db = store._db
    owner = Owner(principal="bench", attributes={"teams": ["bench"]})
    size = 0
    for start in range(0, count, INSERT_ROWS):
        batches = [finished_batch(n, owner) for n in range(start, min(count, start + INSERT_ROWS))]
        rows = [
            batch_row(b, time.time_ns())
            | {"idempotency_ref": idempotency_ref(scope_of(owner), b.idempotency_key or "")}
            for b in batches
        ]
        size = len(rows[0]["record"])
        ended = [{"batch_id": b.batch.id, "ended_at": 1.0} for b in batches]
        await db.write_if(db.batches.insert().values(rows), db.ended.insert().values(ended))
    return size


async def worst_lag(work: "asyncio.Future[object]") -> tuple[object, float]:
    """Run `work` while a 10 ms ticker measures how late the loop wakes it; (result, worst lag in s)."""
    lag = 0.0

    async def tick() -> None:
        nonlocal lag
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lag = max(lag, time.perf_counter() - before - 0.01)

    ticker = asyncio.create_task(tick())
    try:
        result = await work
    finally:
        ticker.cancel()
    return result, lag


async def bench_sweep(backend: str, count: int, work_dir: Path) -> dict[str, object]:
    configs = {
        "sqlite": SqliteSqlStoreConfig(db_path=str(work_dir / f"sweep-{uuid.uuid4().hex[:6]}.db")),
        "postgres": PostgresSqlStoreConfig(host="127.0.0.1", port=5432, db="test", user="postgres"),
    }
    register_sqlstore_backends({"bench_sweep": configs[backend]})
    table = f"bench_sweep_{uuid.uuid4().hex[:8]}"
    store = SQLBatchStore(SqlStoreReference(backend="bench_sweep", table_name=table), None, "")
    await store.initialize()
    try:
        started = time.perf_counter()
        record_bytes = await fill(store, count)
        filled = time.perf_counter() - started

        class NoFiles:
            async def openai_delete_file(self, request: object) -> None: ...

        config = BatchesProviderConfig()
        keeper = Housekeeper(store.retention, NoFiles(), config, clock=lambda: 0.0)  # nothing is due yet
        started = time.perf_counter()
        _, idle_lag = await worst_lag(asyncio.ensure_future(keeper.sweep()))
        idle = time.perf_counter() - started
        keeper.clock = lambda: 10.0**10  # every batch is past its retention
        started = time.perf_counter()
        removed, lag = await worst_lag(asyncio.ensure_future(keeper.sweep()))
        seconds = time.perf_counter() - started
        left = await store.retention.ended_count()
        return {
            "backend": backend,
            "batches": count,
            "record_bytes": record_bytes,
            "fill_s": round(filled, 1),
            "idle_sweep_s": round(idle, 3),
            "idle_lag_ms": round(idle_lag * 1000, 1),
            "sweep_s": round(seconds, 1),
            "rows_per_s": round(removed.rows / seconds) if seconds else 0,  # type: ignore[attr-defined]
            "bytes_removed": removed.bytes,  # type: ignore[attr-defined]
            "worst_lag_ms": round(lag * 1000, 1),
            "left": left,
        }
    finally:
        await store.close()
        if backend == "postgres":
            engine = create_async_engine(POSTGRES_URL)
            async with engine.begin() as connection:
                for suffix in (
                    "",
                    "_shards",
                    "_chunks",
                    "_webhook_endpoints",
                    "_events",
                    "_deliveries",
                    "_ended",
                    "_file_expiries",
                ):
                    await connection.execute(text(f"DROP TABLE IF EXISTS {table}{suffix}"))
            await engine.dispose()


def bench_webhooks(count: int, work_dir: Path) -> dict[str, object]:
    standin = start_standin(work_dir)
    StandInControl(standin.url).configure(latency_mean=0.0)
    stack = start_stack(
        work_dir, work_dir / "state", f"{standin.url}/v1", {"BATCHES_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    )
    try:
        warm_up(stack)
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=30)
        body = {"model": "local/m-chat", "messages": [{"role": "user", "content": "hi"}]}
        line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()
        file_id = client.files.create(file=("one.jsonl", line), purpose="batch").id
        with WebhookReceiver() as receiver:
            endpoint = client.webhooks.create(name="bench", url=receiver.url, event_types=["batch.completed"])
            seen_end, from_event = [], []
            for n in range(count):
                batch = client.batches.create(
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                while (current := client.batches.retrieve(batch.id)).status != "completed":
                    time.sleep(0.01)
                polled_at = time.time()
                received = receiver.wait_for(n + 1, accepted=True)[n]
                event = receiver.events(endpoint.signing_secret)[n]
                seen_end.append(received.at - polled_at)
                from_event.append(received.at - event.created_at)
                _ = current
        return {
            "batches": count,
            "after_poll_saw_end_ms_p50": round(statistics.median(seen_end) * 1000, 1),
            "after_poll_saw_end_ms_max": round(max(seen_end) * 1000, 1),
            "after_event_s_p50": round(statistics.median(from_event), 2),
            "after_event_s_max": round(max(from_event), 2),
        }
    finally:
        stack.stop()
        standin.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["sweep", "webhooks", "both"], default="both")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="retention-bench-"))
    if args.part in ("sweep", "both"):
        for backend in args.backends.split(","):
            print(asyncio.run(bench_sweep(backend, args.batches or 100_000, work_dir)))
    if args.part in ("webhooks", "both"):
        print(bench_webhooks(args.batches if args.part == "webhooks" and args.batches else 30, work_dir))


if __name__ == "__main__":
    main()
