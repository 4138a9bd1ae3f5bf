import asyncio

import pytest

from llama_stack_provider_batches.domain.outages import StoreStalled, is_dependency_outage
from llama_stack_provider_batches.storage import leases
from llama_stack_provider_batches.storage.leases import keep_lease


async def test_a_renewal_that_stalls_is_reported_as_an_outage_long_before_the_lease_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(leases, "STALLED_AFTER_SECONDS", 0.1)
    partition = asyncio.Event()
    failures: list[tuple[float, BaseException]] = []
    lost, finished = asyncio.Event(), asyncio.Event()

    async def renew() -> str | None:
        if partition.is_set():
            await asyncio.sleep(3600)  # no answer and no error, as across a partition
        return "in_progress"

    loop = asyncio.get_running_loop()
    started = loop.time()
    keeper = asyncio.create_task(
        keep_lease(renew, 1.0, lost, finished, lambda: None, "batch_p", lambda exc: failures.append((loop.time(), exc)))
    )
    await asyncio.sleep(0.3)
    assert not failures  # renewals that answer report nothing
    partition.set()
    await asyncio.wait_for(lost.wait(), 3)
    await keeper
    stalled_at, first = failures[0]
    assert isinstance(first, StoreStalled) and is_dependency_outage(first)
    # Reported within a heartbeat (0.2 s) plus the stall limit, while the lease (1 s) still held.
    assert stalled_at - started < 0.3 + 0.2 + 0.1 + 0.1
    assert loop.time() - started >= 1.0


async def test_a_renewal_that_answers_slowly_but_within_the_lease_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "STALLED_AFTER_SECONDS", 0.05)
    lost, finished = asyncio.Event(), asyncio.Event()
    failures: list[BaseException] = []

    async def renew() -> str | None:
        await asyncio.sleep(0.1)
        return "in_progress"

    keeper = asyncio.create_task(keep_lease(renew, 1.0, lost, finished, lambda: None, "batch_s", failures.append))
    await asyncio.sleep(1.5)
    finished.set()
    await keeper
    assert not lost.is_set()
    assert failures and all(isinstance(exc, StoreStalled) for exc in failures)
