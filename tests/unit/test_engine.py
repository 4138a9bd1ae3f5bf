"""The engine over fake Files/Inference/Models APIs: statuses, result files, the window, cancel."""

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService, get_provider_impl
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels
from tests.unit.helpers import chat_line, jsonl

CHAT = "/v1/chat/completions"


async def run_batch(provider: BatchesService, files: FakeFiles, lines: list[dict[str, Any]], **create: Any):
    file_id = files.add(jsonl(lines))
    batch = await provider.create_batch(input_file_id=file_id, endpoint=CHAT, completion_window="24h", **create)
    await provider._runner.wait_idle()
    return await provider.retrieve_batch(batch.id)


def read_lines(files: FakeFiles, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(raw) for raw in files.contents[file_id].splitlines()]


async def test_a_clean_batch_completes_with_an_output_file(provider: BatchesService, files: FakeFiles) -> None:
    batch = await run_batch(provider, files, [chat_line(f"r{i}", f"q{i}") for i in range(10)])
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 10, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.error_file_id is None
    lines = read_lines(files, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(10)]
    assert all(isinstance(line["response"]["body"], dict) for line in lines)
    assert "q3" in lines[3]["response"]["body"]["echo"]
    assert files.names[batch.output_file_id] == f"{batch.id}_output.jsonl"


async def test_backend_errors_go_to_the_error_file(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    def refuse_marked(body: dict[str, Any]) -> None:
        if "refuse" in str(body["messages"]):
            response = httpx.Response(400, request=httpx.Request("POST", "http://model"))
            raise openai.BadRequestError("no", response=response, body={"error": {"message": "refused", "code": "x"}})

    inference.behaviour = refuse_marked
    batch = await run_batch(provider, files, [chat_line("ok"), chat_line("bad", "refuse")])
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [error] = read_lines(files, batch.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] == "refused"


async def test_all_failed_still_completes_without_output_file(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    def crash(_: dict[str, Any]) -> None:
        raise ConnectionError("backend down")

    inference.behaviour = crash
    batch = await run_batch(provider, files, [chat_line("a"), chat_line("b")])
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert [line["error"]["code"] for line in read_lines(files, batch.error_file_id)] == ["connection_error"] * 2


async def test_missing_input_file_fails_validation(provider: BatchesService) -> None:
    batch = await provider.create_batch(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    await provider._runner.wait_idle()
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "failed"
    assert batch.failed_at is not None
    [error] = batch.errors.data
    assert (error.code, error.param) == ("invalid_request", "input_file_id")


async def test_invalid_lines_fail_the_batch_and_run_nothing(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    bad = chat_line("b")
    bad["url"] = "/v1/embeddings"
    batch = await run_batch(provider, files, [chat_line("a"), bad])
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_url", 2)]
    assert inference.calls == []


async def test_unknown_models_are_looked_up_once_each(
    provider: BatchesService, files: FakeFiles, models: FakeModels
) -> None:
    lines = [chat_line(f"r{i}", model="local/ghost" if i % 2 else "local/m-chat") for i in range(20)]
    batch = await run_batch(provider, files, lines)
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("model_not_found", 2, "body.model")]
    assert sorted(models.lookups) == ["local/ghost", "local/m-chat"]


async def test_the_window_is_sliding_not_lock_step(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    # One slow request must not hold back the others: with a window of 4, the 19 fast ones
    # all finish while the slow one is still running.
    release = asyncio.Event()

    async def slow_first(body: dict[str, Any]) -> None:
        if "slow" in str(body["messages"]):
            await release.wait()

    inference.behaviour = slow_first
    file_id = files.add(jsonl([chat_line("slow", "slow"), *(chat_line(f"f{i}") for i in range(19))]))
    batch = await provider.create_batch(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    for _ in range(200):
        if len(inference.calls) == 20:
            break
        await asyncio.sleep(0.01)
    assert len(inference.calls) == 20
    assert inference.in_flight == 1
    release.set()
    await provider._runner.wait_idle()
    assert (await provider.retrieve_batch(batch.id)).status == "completed"
    assert inference.max_in_flight == 4


async def test_cancel_mid_run_keeps_partial_results(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    gate = asyncio.Event()

    async def wait_after_ten(_: dict[str, Any]) -> None:
        if len(inference.calls) > 10:
            await gate.wait()

    inference.behaviour = wait_after_ten
    file_id = files.add(jsonl([chat_line(f"r{i}") for i in range(100)]))
    batch = await provider.create_batch(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    while len(inference.calls) < 14:
        await asyncio.sleep(0.01)
    cancelling = await provider.cancel_batch(batch.id)
    assert cancelling.status == "cancelling"
    gate.set()
    await provider._runner.wait_idle()
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "cancelled"
    assert batch.cancelled_at is not None
    assert len(inference.calls) == 14  # nothing dispatched after the cancel
    output = read_lines(files, batch.output_file_id)
    assert len(output) == 14 == batch.request_counts.completed
    assert batch.request_counts.total == 100


async def test_batches_beyond_the_limit_wait_their_turn(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    from llama_stack_api import Api

    config = config.model_copy(update={"max_concurrent_batches": 1})
    provider = await get_provider_impl(config, {Api.files: files, Api.inference: inference, Api.models: models})
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


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/embeddings"])
async def test_other_endpoints_run(provider: BatchesService, files: FakeFiles, endpoint: str) -> None:
    field = {"/v1/completions": "prompt", "/v1/embeddings": "input"}[endpoint]
    lines = [{"custom_id": "x", "method": "POST", "url": endpoint, "body": {"model": "local/m-embed", field: "t"}}]
    file_id = files.add(jsonl(lines))
    batch = await provider.create_batch(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    await provider._runner.wait_idle()
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "completed"
    assert read_lines(files, batch.output_file_id)[0]["custom_id"] == "x"
