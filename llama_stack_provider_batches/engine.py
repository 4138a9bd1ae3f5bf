"""The execution engine: claims batches from the store and runs their jobs (job.py) in the
background of the server's event loop.

A claim loop takes the leases of unfinished batches, oldest first, as long as fewer than
`max_concurrent_batches` jobs run here. It looks at once when this server creates a batch, and
every POLL_SECONDS otherwise: that is how batches left by an earlier run (a restart) or by a dead
replica (once its leases expire) are resumed, and how idle replicas pick up waiting batches.
Jobs it starts run as their batch's owner (job.py), in a context of their own. The exception: a
batch whose creating request carried provider credentials (per-request API keys, never stored) is
created already claimed by this server and run here in that request's context, with them.

While a job runs, a heartbeat renews its lease about every second. Renewing returns the batch's
status, so a cancel made through another replica reaches the job within a heartbeat; a lease that
cannot be renewed ends the job at once, without writing anything (another server has the batch, or
soon will). A server stop ends every job, leaves each batch in a status it resumes from and
releases its lease, so that another replica can take it over at once. A job that fails on an
internal error (a store or files outage, say) keeps its stored results and is tried again after a
growing pause (up to a minute), still holding its lease.
"""

import asyncio
import contextlib
import contextvars
import os
import socket
import time
import uuid
from collections.abc import Callable

from llama_stack.log import get_logger
from llama_stack_api import Files, Inference, Models

from .config import BatchesProviderConfig
from .endpoints import RequestSender
from .job import BatchJob, JobSettings
from .resilience import RateLimiter, RetryPolicy
from .store import BatchStore, Lease, LeaseLostError

logger = get_logger(name=__name__, category="providers")

RETRY_DELAYS_SECONDS = (1.0, 5.0, 30.0, 60.0)
POLL_SECONDS = 1.0
MAX_HEARTBEAT_SECONDS = 1.0
STORE_CALL_SECONDS = 2.0  # how long a background task stopping is given to finish its store call


def retry_delay(attempt: int) -> float:
    """The pause before retry number `attempt` (0-based) after an internal error."""
    return RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS) - 1)]


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


def server_name() -> str:
    """Who holds a lease: readable in the store, unique per server process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class BatchRunner:
    """Claims batches and runs their jobs."""

    def __init__(
        self,
        store: BatchStore,
        config: BatchesProviderConfig,
        inference: Inference,
        files: Files,
        models: Models,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sender = RequestSender(
            inference,
            RetryPolicy(config.max_attempts, config.backoff_initial_seconds, config.backoff_max_seconds),
            config.request_timeout_seconds,
            budget=asyncio.Semaphore(config.max_in_flight_requests) if config.max_in_flight_requests else None,
            pacer=RateLimiter(config.requests_per_second_per_model) if config.requests_per_second_per_model else None,
        )
        self._files = files
        self._models = models
        self._clock = clock
        self._settings = JobSettings(
            window=config.max_concurrent_requests_per_batch,
            grace_seconds=config.cancel_grace_seconds,
            shutdown_grace_seconds=config.shutdown_grace_seconds,
        )
        self._max_jobs = config.max_concurrent_batches
        self.lease_seconds = config.lease_seconds
        self._heartbeat_seconds = min(MAX_HEARTBEAT_SECONDS, config.lease_seconds / 5)
        self.holder = server_name()
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: dict[str, asyncio.Event] = {}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._claim_loop: asyncio.Task[None] | None = None
        # Claim passes started and finished: lets `wait_idle` know a wake-up has been acted on.
        self._passes_wanted = 0
        self._passes_done = 0

    # --- control --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim loop on the running event loop; the first call does it, later ones nothing."""
        if self._claim_loop is None and not self._stopping.is_set():
            self._passes_wanted += 1
            # An empty context: jobs must not inherit the identity or credentials of whichever
            # request happened to start the loop.
            loop = self._claim_forever()
            self._claim_loop = asyncio.create_task(loop, name="batches:claims", context=contextvars.Context())

    def wake(self) -> None:
        """Look for work now (a batch was just created here)."""
        self._passes_wanted += 1
        self._wake.set()

    def adopt(self, lease: Lease) -> None:
        """Run a batch created here already claimed, in the current (creating request's) context."""
        self._launch(lease)

    def request_cancel(self, batch_id: str) -> None:
        """Tell a batch running here to stop dispatching; it then writes its partial results."""
        if event := self._cancel_requested.get(batch_id):
            event.set()

    def running(self) -> list[str]:
        """The ids of the batches whose jobs run here."""
        return list(self._tasks)

    async def wait_idle(self) -> None:
        """Wait until every claimable batch has been claimed and every job here has stopped."""
        while self._tasks or (self._claim_loop is not None and self._passes_done < self._passes_wanted):
            if self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            else:
                await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        """Stop every job without changing any batch's status, so that it can be resumed.

        Running jobs stop dispatching, give their requests in flight `shutdown_grace_seconds`, store
        every result they have, and release their leases.
        """
        self._stopping.set()
        self._wake.set()
        if self._claim_loop is not None:
            await finish_or_cancel(self._claim_loop, STORE_CALL_SECONDS)
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._settings.shutdown_grace_seconds + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- claiming -------------------------------------------------------------------------------

    async def _claim_forever(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            wanted = self._passes_wanted
            self._wake.clear()
            try:
                free = self._max_jobs - len(self._tasks)
                leases = await self._store.claim(self.holder, free, self.lease_seconds) if free > 0 else []
            except Exception:
                delay = retry_delay(attempt)
                logger.exception("Cannot claim batches; retrying", retry_in=delay)
                attempt += 1
                await wait_at_most(self._wake, delay)
                continue
            attempt = 0
            for lease in leases:
                self._launch(lease)
            self._passes_done = wanted
            await wait_at_most(self._wake, POLL_SECONDS)

    def _launch(self, lease: Lease) -> None:
        if self._stopping.is_set():
            return
        batch_id = lease.batch_id
        self._cancel_requested[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._run(lease), name=f"batch:{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._forget(batch_id))

    def _forget(self, batch_id: str) -> None:
        self._tasks.pop(batch_id, None)
        self._cancel_requested.pop(batch_id, None)
        self.wake()  # a slot is free

    # --- running --------------------------------------------------------------------------------

    async def _run(self, lease: Lease) -> None:
        lost, finished = asyncio.Event(), asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(lease, lost, finished), name=f"lease:{lease.batch_id}")
        try:
            await self._run_with_retries(lease, lost)
        finally:
            finished.set()
            await finish_or_cancel(heartbeat, STORE_CALL_SECONDS)
            if lost.is_set():
                logger.warning("Lease lost; batch left to the server holding it now", batch_id=lease.batch_id)
            else:
                await self._release(lease)

    async def _run_with_retries(self, lease: Lease, lost: asyncio.Event) -> None:
        attempt = 0
        while not self._stopping.is_set() and not lost.is_set():
            try:
                async with self._slots:  # only an adopted batch ever waits here
                    if self._stopping.is_set() or lost.is_set():
                        return
                    await self._job(lease, lost).run()
                return
            except LeaseLostError:  # a write was refused: another server holds the batch now
                lost.set()
                return
            except Exception:
                delay = retry_delay(attempt)
                logger.exception("Batch job failed; results kept, retrying", batch_id=lease.batch_id, retry_in=delay)
                attempt += 1
                await wait_at_most(lost, delay)

    async def _heartbeat(self, lease: Lease, lost: asyncio.Event, finished: asyncio.Event) -> None:
        """Renew the lease until the job has `finished`; pass on a cancel; set `lost` once the lease may be gone."""
        valid_until = time.monotonic() + self.lease_seconds
        while not await wait_at_most(finished, self._heartbeat_seconds):
            sent = time.monotonic()
            try:
                status = await self._store.renew(lease, self.lease_seconds)
            except Exception:
                logger.exception("Cannot renew a lease", batch_id=lease.batch_id)
                # Past the last renewal's expiry another server may already run the batch.
                if time.monotonic() + self._heartbeat_seconds >= valid_until:
                    lost.set()
                    return
                continue
            if status is None:
                lost.set()
                return
            valid_until = sent + self.lease_seconds
            if status == "cancelling":
                self.request_cancel(lease.batch_id)

    async def _release(self, lease: Lease) -> None:
        try:
            await self._store.release(lease)
        except Exception:  # it expires on its own
            logger.exception("Cannot release a lease", batch_id=lease.batch_id)

    def _job(self, lease: Lease, lost: asyncio.Event) -> BatchJob:
        return BatchJob(
            lease=lease,
            store=self._store,
            sender=self._sender,
            files=self._files,
            models=self._models,
            settings=self._settings,
            cancel_requested=self._cancel_requested[lease.batch_id],
            stopping=self._stopping,
            lease_lost=lost,
            clock=self._clock,
        )
