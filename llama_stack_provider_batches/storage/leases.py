"""Keeping a lease while a batch runs, and stopping background tasks between store calls.

While a job runs, `keep_lease` renews its lease about every second. Renewing returns the batch's
status, so a cancel made through another replica reaches the job within a heartbeat; a lease that
cannot be renewed before it runs out ends the job at once (`lost`): another server may hold the
batch by then.
"""

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from ..domain.outages import STALLED_AFTER_SECONDS, StoreStalled, log_failure
from ..stack import get_logger

logger = get_logger(name=__name__, category="providers")

MAX_HEARTBEAT_SECONDS = 1.0
STORE_CALL_SECONDS = 2.0  # how long a background task stopping is given to finish its store call


def server_name() -> str:
    """Who holds a lease: readable in the store, unique per server process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def heartbeat_seconds(lease_seconds: float) -> float:
    """How often a lease is renewed: several times within its length, at least every second."""
    return min(MAX_HEARTBEAT_SECONDS, lease_seconds / 5)


async def wait_at_most(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` have passed; return whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


async def finish_or_cancel(task: asyncio.Task[None], seconds: float) -> None:
    """Let a task that was told to stop finish what it is doing; cancel it if that takes too long.

    Cancelling a store call half-way leaves the driver's worker thread to answer a loop that may be
    gone by then, so background tasks are stopped between calls whenever possible.
    """
    _, late = await asyncio.wait({task}, timeout=seconds)
    for unfinished in late:
        unfinished.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _renew_within(
    renew: Callable[[], Awaitable[str | None]], seconds: float, on_stall: Callable[[BaseException], None]
) -> str | None:
    """One renewal, given at most `seconds` (what is left of the lease: a renewal that stalls past it
    must not let the job run on without it). One that stalls for STALLED_AFTER_SECONDS is reported to
    `on_stall` while it goes on: a partitioned store answers nothing for minutes, and the work that
    needs the store should pause well before the lease runs out."""
    renewal = asyncio.ensure_future(renew())
    patience = min(STALLED_AFTER_SECONDS, max(0.0, seconds))
    _, pending = await asyncio.wait({renewal}, timeout=patience)
    if pending:
        on_stall(StoreStalled(f"a lease renewal has not answered in {patience:.1f} s"))
    try:
        return await asyncio.wait_for(renewal, max(0.0, seconds - patience))
    except TimeoutError:
        raise StoreStalled("a lease renewal did not answer before the lease ran out") from None


async def keep_lease(
    renew: Callable[[], Awaitable[str | None]],
    lease_seconds: float,
    lost: asyncio.Event,
    finished: asyncio.Event,
    on_cancelling: Callable[[], None],
    batch_id: str,
    on_failure: Callable[[BaseException], None] = lambda _: None,
    stop_statuses: frozenset[str] = frozenset({"cancelling"}),
) -> None:
    """Renew a lease (of a batch or a shard: `renew` returns the batch's status, None once the lease is
    gone) until `finished`; call `on_cancelling` when the batch enters one of `stop_statuses` (it is
    being cancelled), `on_failure` when a renewal fails; set `lost` once the lease may be gone."""
    every = heartbeat_seconds(lease_seconds)
    valid_until = time.monotonic() + lease_seconds
    failing = False
    while not await wait_at_most(finished, every):
        sent = time.monotonic()
        try:
            status = await _renew_within(renew, valid_until - sent, on_failure)
        except Exception as exc:
            if not failing:  # once per run of failures: an outage must not flood the log
                log_failure(logger, "Cannot renew a lease", exc, batch_id=batch_id)
            failing = True
            on_failure(exc)
            # Past the last renewal's expiry another server may already run the batch.
            if time.monotonic() + every >= valid_until:
                lost.set()
                return
            continue
        failing = False
        if status is None:
            lost.set()
            return
        valid_until = sent + lease_seconds
        if status in stop_statuses:
            on_cancelling()
