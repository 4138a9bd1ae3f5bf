"""Builders of batch input lines for unit tests."""

import asyncio
import json
from typing import Any

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.stack import BatchObject
from tests.unit.conftest import ProviderFactory


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode()


def chat_line(custom_id: str, content: str = "hi", model: str = "local/m-chat") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }


def make_batch(batch_id: str = "batch_1", status: str = "validating", **fields: Any) -> BatchObject:
    """A batch object as the service would store it, with `fields` overriding the defaults."""
    defaults = {
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "created_at": 1,
    }
    return BatchObject(id=batch_id, status=status, **{**defaults, **fields})


CHAT = "/v1/chat/completions"


async def create_chat_batch(provider: Any, files: Any, lines: list[dict[str, Any]], **create: Any) -> BatchObject:
    """Create a chat batch over `lines`; return at once."""
    file_id = files.add(jsonl(lines))
    return await provider.create_batch(input_file_id=file_id, endpoint=CHAT, completion_window="24h", **create)


async def run_batch(provider: Any, files: Any, lines: list[dict[str, Any]], **create: Any) -> BatchObject:
    """Create a chat batch over `lines` and wait until the provider's engine is idle."""
    batch = await create_chat_batch(provider, files, lines, **create)
    await provider._runner.wait_idle()
    return await provider.retrieve_batch(batch.id)


def read_lines(files: Any, file_id: str | None) -> list[dict[str, Any]]:
    """The parsed lines of a result file kept by the fake Files API."""
    assert file_id is not None
    return [json.loads(raw) for raw in files.contents[file_id].splitlines()]


async def start_batch(provider: Any, files: Any, requests: int) -> BatchObject:
    """Create a chat batch of `requests` requests with custom ids r0, r1, ...; return at once."""
    return await create_chat_batch(provider, files, [chat_line(f"r{i}") for i in range(requests)])


async def restarted(make_provider: ProviderFactory, **settings: Any) -> BatchesService:
    """A new server over the same store, as after a restart: started outside any request (as on the serving
    loop's first refresh); returns once it has run all it resumed."""
    server = await make_provider(**settings)
    server.start()
    await server._runner.wait_idle()
    return server


async def wait_until_completed(provider: Any, batch_id: str, requests: int) -> None:
    """Wait until at least `requests` results of the batch are stored and counted."""
    while (await provider.retrieve_batch(batch_id)).request_counts.completed < requests:
        await asyncio.sleep(0.02)


def hold_requests(inference: Any, mentioning: str = "") -> asyncio.Event:
    """Make every request (or those whose messages mention `mentioning`) wait until the returned event is
    set, so that batches stay unfinished."""
    gate = asyncio.Event()

    async def wait(body: dict[str, Any]) -> None:
        if mentioning in str(body.get("messages")):
            await gate.wait()

    inference.behaviour = wait
    return gate


async def occupy_the_only_slot(provider: Any, files: Any, inference: Any) -> tuple[BatchObject, asyncio.Event]:
    """Start a one-request batch whose request waits until the returned event is set; return once it waits.

    For a provider with `max_concurrent_batches=1`: every batch created next waits for the slot.
    """
    gate = hold_requests(inference)  # every request waits, those of later batches too, until the gate opens
    running = await start_batch(provider, files, 1)
    while not inference.calls:
        await asyncio.sleep(0.005)
    return running, gate


async def wait_for_status(provider: Any, batch_id: str, status: str, seconds: float = 2) -> BatchObject:
    """The batch once it has `status`, or as it is after `seconds`."""
    for _ in range(int(seconds / 0.02)):
        batch = await provider.retrieve_batch(batch_id)
        if batch.status == status:
            return batch
        await asyncio.sleep(0.02)
    return await provider.retrieve_batch(batch_id)


async def running_settles_to(provider: Any, batch_ids: list[str], seconds: float = 2) -> list[str]:
    """The ids of the batches running on the provider once they are `batch_ids`, or after `seconds`
    (a job that just closed a batch still releases its lease after the status is written)."""
    for _ in range(int(seconds / 0.02)):
        if provider._runner.running() == batch_ids:
            break
        await asyncio.sleep(0.02)
    return provider._runner.running()
