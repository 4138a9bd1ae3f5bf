"""Attempts at one batch's job: an unexpected failure is tried again, a bounded number of times.

A job that raises (a bug, a record that breaks something) keeps its stored results and is run again
after a pause that doubles from `job_retry_initial_seconds` up to `job_retry_max_seconds`, still
holding its slot and lease; the log shows the traceback once per attempt. Failures are counted in
the batch record (`processing_failures`), so the count goes on across restarts and replicas; a
batch with more results than at its last failure starts counting again. At `max_job_attempts` the
batch gives up (job.py): it ends `failed` (or `cancelled`, if that was asked) with an `errors` entry
naming the last error, keeping its results in its files; a batch whose every request has a stored
result ends `completed` instead. Should even that fail, the batch is set aside (runner.py).

An outage of a dependency (outages.py: the database, the file store) is not the batch's failure:
it is not counted, and the job runs again after a pause of a gate of its own (the process's gate
reopens on any request's success, which says nothing of the files a job may be waiting for), for as long as the batch's
lease holds (a store that stays out ends the lease, and the batch is resumed once it is back), up
to `outage_grace_seconds` past the batch's deadline; then the batch gives up as above.
"""

import asyncio
import time
from collections.abc import Callable
from enum import Enum

from ..config import BatchesProviderConfig
from ..domain.outages import DependencyGate, is_dependency_outage, log_failure
from ..domain.records import StoredBatch
from ..stack import get_logger
from ..storage.leases import wait_at_most
from ..storage.store import BatchStore, Lease, LeaseLostError
from .job import BatchJob

logger = get_logger(name=__name__, category="providers")

MAX_CAUSE_CHARS = 500


class Ending(Enum):
    """How the attempts at a job ended."""

    DONE = "done"  # the job ran to its end, or stopped (server stop, lease lost) as it should
    GAVE_UP = "gave_up"  # the batch ended failed after too many failures
    SET_ASIDE = "set_aside"  # it failed too often and could not even be marked failed


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_CAUSE_CHARS].encode("utf-8", "replace").decode()


def outage_cause(exc: BaseException) -> str:
    """The `errors` message of a batch that waited out an outage past its deadline and grace."""
    return f"A dependency (the database or the file store) did not answer past the batch's deadline: {_described(exc)}"


def failure_cause(failures: int, exc: BaseException) -> str:
    """The `errors` message of a batch that failed for good: how often, and the last error, bounded."""
    return f"Processing the batch failed {failures} times; the last error was {_described(exc)}"


class JobAttempts:
    """Runs a batch's job until it ends, within `max_job_attempts`."""

    def __init__(
        self,
        store: BatchStore,
        config: BatchesProviderConfig,
        stopping: asyncio.Event,
        make_job: Callable[[Lease, asyncio.Event], BatchJob],
        clock: Callable[[], float] = time.time,
        make_gate: Callable[[], DependencyGate] = DependencyGate,
    ) -> None:
        self._clock = clock
        self._store = store
        self._config = config
        self._stopping = stopping
        self._make_job = make_job
        self._make_gate = make_gate

    def delay(self, failures: int) -> float:
        """The pause after the `failures`-th failure (1-based)."""
        return min(self._config.job_retry_max_seconds, self._config.job_retry_initial_seconds * 2 ** (failures - 1))

    async def run(self, lease: Lease, lost: asyncio.Event) -> Ending:
        failures_here = 0
        outage = self._make_gate()  # the pauses of this run's waits for a dependency
        gives_up_at: float | None = None  # when an outage is waited out no longer: read at the first one
        while not self._stopping.is_set() and not lost.is_set():
            try:
                await self._make_job(lease, lost).run()
                return Ending.DONE
            except LeaseLostError:  # a write was refused: another server holds the batch now
                lost.set()
                return Ending.DONE
            except Exception as exc:
                if is_dependency_outage(exc):
                    outage.trip(exc)
                    gives_up_at = gives_up_at or await self._outage_deadline(lease.batch_id)
                    if gives_up_at is not None and self._clock() >= gives_up_at:
                        logger.error("A dependency stayed out past the batch's grace", batch_id=lease.batch_id)
                        return await self._give_up(lease, lost, outage_cause(exc), outage=True)
                    await outage.wait_open()
                    continue
                failures_here += 1
                failures = await self._count_failure(lease, lost, failures_here)
                if lost.is_set():  # another server has the batch now: ending it is not ours to do
                    return Ending.DONE
                if failures >= self._config.max_job_attempts:
                    logger.exception("Batch processing failed for the last time", batch_id=lease.batch_id)
                    return await self._give_up(lease, lost, failure_cause(failures, exc))
                delay = self.delay(failures)
                logger.exception("Batch processing failed; results kept", batch_id=lease.batch_id, retry_in=delay)
                await wait_at_most(self._stopping, delay)
        return Ending.DONE

    async def _outage_deadline(self, batch_id: str) -> float | None:
        """The batch's deadline plus `outage_grace_seconds`; None if the store cannot say (it is out too)."""
        try:
            stored = await self._store.get(batch_id)
        except Exception:
            return None
        if stored is None or stored.batch.expires_at is None:
            return None
        return stored.batch.expires_at + self._config.outage_grace_seconds

    async def _count_failure(self, lease: Lease, lost: asyncio.Event, failures_here: int) -> int:
        """Add one to the batch's stored count of failures, or start it again at one if the batch has
        more results than at its last failure; return the count (this run's if the store refuses)."""
        try:
            progress = await self._store.shards.progress([lease.batch_id])
            tally = progress.get(lease.batch_id)
            results = tally.completed + tally.failed if tally else 0

            def one_more(stored: StoredBatch) -> StoredBatch:
                count = stored.processing_failures + 1 if results <= stored.results_at_last_failure else 1
                return stored.model_copy(update={"processing_failures": count, "results_at_last_failure": results})

            stored = await self._store.update_record(lease.batch_id, one_more, lease)
        except LeaseLostError:
            lost.set()
            return failures_here
        except Exception as exc:
            log_failure(logger, "Cannot count a failure of a batch", exc, batch_id=lease.batch_id)
            return failures_here
        return stored.processing_failures

    async def _give_up(self, lease: Lease, lost: asyncio.Event, cause: str, outage: bool = False) -> Ending:
        try:
            await self._make_job(lease, lost).give_up(cause, outage)
        except LeaseLostError:
            lost.set()
        except Exception as exc:
            message = "Cannot end a failing batch; set aside until the server stops"
            log_failure(logger, message, exc, batch_id=lease.batch_id)
            return Ending.SET_ASIDE
        return Ending.GAVE_UP
