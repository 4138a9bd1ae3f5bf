"""Scheduling batch jobs: the concurrency limit across batches, retries after internal errors."""

import asyncio
from typing import Any

import pytest

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService
from llama_stack_provider_batches.idempotency import CreateParams
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels
from tests.unit.helpers import CHAT, chat_line, jsonl, provider_with, read_lines, run_batch


async def test_batches_beyond_the_limit_wait_their_turn(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    provider = await provider_with(config, files, inference, models, max_concurrent_batches=1)
    gate = asyncio.Event()

    async def hold(_: dict[str, Any]) -> None:
        await gate.wait()

    inference.behaviour = hold
    first = await provider.create_batch(
        input_file_id=files.add(jsonl([chat_line("a")])), endpoint=CHAT, completion_window="24h"
    )
    second = await provider.create_batch(
        input_file_id=files.add(jsonl([chat_line("b")])), endpoint=CHAT, completion_window="24h"
    )
    await asyncio.sleep(0.2)
    assert (await provider.retrieve_batch(first.id)).status == "in_progress"
    assert (await provider.retrieve_batch(second.id)).status == "validating"
    gate.set()
    await provider._runner.wait_idle()
    assert (await provider.retrieve_batch(second.id)).status == "completed"
    await provider.shutdown()


async def test_an_internal_error_is_retried_without_losing_results(
    provider: BatchesService, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_stack_provider_batches import engine

    monkeypatch.setattr(engine, "RETRY_DELAYS_SECONDS", (0.01,))
    real_upload = files.openai_upload_file
    failures = []

    async def flaky_upload(request: Any, file: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OSError("disk full")
        return await real_upload(request, file)

    monkeypatch.setattr(files, "openai_upload_file", flaky_upload)
    batch = await run_batch(provider, files, [chat_line(f"r{i}") for i in range(5)])
    assert failures == [1]
    assert batch.status == "completed"
    assert len(read_lines(files, batch.output_file_id)) == 5


async def test_a_server_stop_leaves_batches_resumable_and_a_start_resumes_them(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    async def slow(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)

    inference.behaviour = slow
    first = await provider_with(config, files, inference, models, shutdown_grace_seconds=2)
    running = await first.create_batch(
        input_file_id=files.add(jsonl([chat_line(f"r{i}") for i in range(100)])), endpoint=CHAT, completion_window="24h"
    )
    waiting = await first.create_batch(
        input_file_id=files.add(jsonl([chat_line("w")])), endpoint=CHAT, completion_window="24h"
    )
    while (await first.retrieve_batch(running.id)).request_counts.completed < 20:
        await asyncio.sleep(0.02)
    await first.shutdown()
    stopped = await first.retrieve_batch(running.id)
    assert stopped.status == "in_progress"
    assert (await first.retrieve_batch(waiting.id)).status == "validating"
    assert stopped.request_counts.completed == len(inference.calls)  # in-flight requests finished and were stored

    second = await provider_with(config, files, inference, models)
    second.start()  # as on the serving loop's first refresh
    await second._runner.wait_idle()
    done = await second.retrieve_batch(running.id)
    assert done.status == "completed"
    assert sorted(line["custom_id"] for line in read_lines(files, done.output_file_id)) == sorted(
        f"r{i}" for i in range(100)
    )
    assert len(inference.calls) == 101  # nothing ran twice
    assert (await second.retrieve_batch(waiting.id)).status == "completed"
    assert await second._store.active_ids() == []
    assert second._runner.running() == []
    await second.shutdown()


async def test_claims_are_retried_while_the_store_fails(
    provider: BatchesService, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_stack_provider_batches import engine

    monkeypatch.setattr(engine, "RETRY_DELAYS_SECONDS", (0.01,))
    params = CreateParams(files.add(jsonl([chat_line("a")])), CHAT, "24h", None)
    stored, _ = await provider._store.create(provider._new_batch(params, owner=None, key=None))  # as before a restart
    real_claim = provider._store.claim
    failures: list[int] = []

    async def flaky_claim(*args: Any) -> list[Any]:
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("store not reachable yet")
        return await real_claim(*args)

    monkeypatch.setattr(provider._store, "claim", flaky_claim)
    provider.start()
    await provider._runner.wait_idle()
    assert failures == [1, 1]
    assert (await provider.retrieve_batch(stored.batch.id)).status == "completed"
