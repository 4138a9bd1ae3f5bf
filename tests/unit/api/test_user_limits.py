"""Per-user limits on waiting work: creates beyond them answer HTTP 429 naming the limit."""

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_stack_provider_batches.api.user_limits import count_requests
from llama_stack_provider_batches.domain.errors import LimitReachedError
from llama_stack_provider_batches.stack import RequestProviderDataContext, User
from tests.unit.conftest import ProviderFactory
from tests.unit.helpers import CHAT, chat_line, hold_requests, jsonl, wait_for_status

ALICE = User("alice", {"teams": ["red"]})
BOB = User("bob", {"teams": ["blue"]})


@given(
    st.lists(st.sampled_from(["x", "", "  ", "\t", "\r", '{"a":\r1}']), max_size=30), st.sampled_from(["\n", "\r\n"])
)
def test_requests_are_the_lines_that_are_not_blank(lines: list[str], end: str) -> None:
    content = end.join(lines).encode()
    assert count_requests(content) == sum(1 for line in lines if line.strip())


async def create_as(
    user: User, provider: Any, files: Any, requests: int, key: str | None = None, file_id: str | None = None
) -> Any:
    with RequestProviderDataContext(user=user):
        file_id = file_id or files.add(jsonl([chat_line(f"r{n}") for n in range(requests)]))
        return await provider.create_batch(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h", idempotency_key=key
        )


async def test_a_user_beyond_the_unfinished_batch_limit_is_refused_with_429(
    make_provider: ProviderFactory, files: Any, inference: Any
) -> None:
    provider = await make_provider(max_active_batches_per_user=2)
    gate = hold_requests(inference)
    first = await create_as(ALICE, provider, files, 1, key="k1")
    await create_as(ALICE, provider, files, 1)
    with pytest.raises(LimitReachedError) as refused:
        await create_as(ALICE, provider, files, 1)
    assert refused.value.status_code == 429
    assert "max_active_batches_per_user: 2" in str(refused.value) and refused.value.code == "rate_limit_exceeded"
    # A repeat of a key that has its batch creates nothing, so it is not refused; other users are not limited.
    assert (await create_as(ALICE, provider, files, 1, key="k1", file_id=first.input_file_id)).id == first.id
    await create_as(BOB, provider, files, 1)
    gate.set()
    with RequestProviderDataContext(user=ALICE):
        assert (await wait_for_status(provider, first.id, "completed", 5)).status == "completed"
        await provider._runner.wait_idle()
    await create_as(ALICE, provider, files, 1)  # finished batches do not count
    await provider.shutdown()


async def test_a_user_beyond_the_queued_request_limit_is_refused_with_429(
    make_provider: ProviderFactory, files: Any, inference: Any
) -> None:
    provider = await make_provider(max_queued_requests_per_user=10)
    gate = hold_requests(inference)
    running = await create_as(ALICE, provider, files, 6)
    with RequestProviderDataContext(user=ALICE):
        await wait_for_status(provider, running.id, "in_progress")
    await create_as(ALICE, provider, files, 3)  # validating or running: 9 queued
    with pytest.raises(LimitReachedError) as refused:
        await create_as(ALICE, provider, files, 2)
    assert "2 requests and the 9 not yet run" in str(refused.value)
    assert "max_queued_requests_per_user: 10" in str(refused.value)
    with pytest.raises(LimitReachedError):
        await create_as(BOB, provider, files, 11)  # more than the limit on its own
    await create_as(BOB, provider, files, 10)
    gate.set()
    await provider.shutdown()


async def test_concurrent_creates_of_one_user_stay_within_the_limit(
    make_provider: ProviderFactory, files: Any, inference: Any
) -> None:
    provider = await make_provider(max_active_batches_per_user=3)
    gate = hold_requests(inference)
    results = await asyncio.gather(*(create_as(ALICE, provider, files, 1) for _ in range(8)), return_exceptions=True)
    assert sum(not isinstance(result, BaseException) for result in results) == 3
    assert all(isinstance(result, LimitReachedError) for result in results if isinstance(result, BaseException))
    gate.set()
    await provider.shutdown()
