"""The execution engine: runs batch jobs (job.py) in the background of the server's event loop.

At most `max_concurrent_batches` jobs run at once; the others wait their turn in the order they
were submitted. At start-up every unfinished batch is submitted again, oldest first. A cancel
reaches a running job through an event; a server stop reaches every job through another, and
leaves each batch in a status it resumes from. A job that fails on an internal
error (a store or files outage, say) keeps its stored results and is tried again after a growing
pause (up to a minute), so no batch is left stranded and no finished work is thrown away.
"""

import asyncio
import time
from collections.abc import Callable

from llama_stack.log import get_logger
from llama_stack_api import Files, Inference, Models

from .config import BatchesProviderConfig
from .endpoints import RequestSender
from .job import BatchJob, JobSettings
from .resilience import RateLimiter, RetryPolicy
from .store import BatchStore

logger = get_logger(name=__name__, category="providers")

RETRY_DELAYS_SECONDS = (1.0, 5.0, 30.0, 60.0)


def retry_delay(attempt: int) -> float:
    """The pause before retry number `attempt` (0-based) after an internal error."""
    return RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS) - 1)]


class BatchRunner:
    """Schedules batch jobs."""

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
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: dict[str, asyncio.Event] = {}
        self._stopping = asyncio.Event()

    async def resume(self) -> None:
        """Submit every unfinished batch found in the store, oldest first; retry while the store fails."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                active = await self._store.active_ids()
            except Exception:
                delay = retry_delay(attempt)
                logger.exception("Cannot read the unfinished batches; retrying", retry_in=delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if active:
                logger.info("Resuming unfinished batches", count=len(active))
            for batch_id in active:
                self.submit(batch_id)
            return

    def submit(self, batch_id: str) -> None:
        """Start running a batch unless it already runs here or the server is stopping."""
        if batch_id in self._tasks or self._stopping.is_set():
            return
        self._cancel_requested[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._run(batch_id), name=f"batch:{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._forget(batch_id))

    def _forget(self, batch_id: str) -> None:
        self._tasks.pop(batch_id, None)
        self._cancel_requested.pop(batch_id, None)

    def request_cancel(self, batch_id: str) -> None:
        """Tell a running batch to stop dispatching; it then writes its partial results."""
        if event := self._cancel_requested.get(batch_id):
            event.set()

    async def wait_idle(self) -> None:
        """Wait until every submitted batch has stopped."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop every job without changing any batch's status, so that a restart can resume them.

        Running jobs stop dispatching, give their requests in flight `shutdown_grace_seconds`, store
        every result they have, and return.
        """
        self._stopping.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._settings.shutdown_grace_seconds + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, batch_id: str) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with self._slots:
                    if not self._stopping.is_set():
                        await self._job(batch_id).run()
                return
            except Exception:
                delay = retry_delay(attempt)
                logger.exception("Batch job failed; results kept, retrying", batch_id=batch_id, retry_in=delay)
                attempt += 1
                await asyncio.sleep(delay)

    def _job(self, batch_id: str) -> BatchJob:
        return BatchJob(
            batch_id=batch_id,
            store=self._store,
            sender=self._sender,
            files=self._files,
            models=self._models,
            settings=self._settings,
            cancel_requested=self._cancel_requested[batch_id],
            stopping=self._stopping,
            clock=self._clock,
        )
