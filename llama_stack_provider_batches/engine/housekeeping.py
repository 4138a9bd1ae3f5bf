"""The sweep that keeps storage bounded, run by every process every `sweep_interval_seconds`.

Each pass, in bounded steps (SWEEP_ROWS at a time, repeated until nothing is due):
- the first pass of a process gives every ended batch without an ended time one (batches that
  ended before this release, or came from a kvstore), so that retention reaches them too;
- result files whose `output_expires_after` has passed are deleted through the Files API, as their
  owner, whether or not the Files provider deletes expired files itself (localfs does not). A delete
  that fails is tried again later (after FIRST_RETRY_SECONDS, doubling) while the others go on; after
  MAX_DELETE_TRIES failures in a process the file is given up, with a log line. An outage of the
  Files API ends the deletes of this pass, counted against no file;
- batch records whose retention (`retention_days` after they ended) has passed are removed, with
  their idempotency keys and anything left of their stored work;
- shard rows and result chunks left behind for batches that have ended (a process that crashed
  while one was being ended, or lost its lease) are removed; but not the results of a batch that
  ended without result files (job.py), their only copy, which go with its record.
The records and leftovers are removed whatever happened to the files. Processes sweeping at the
same time do no harm: every removal is a DELETE of rows that may already be gone, and a file
deleted twice is "not found" the second time.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import telemetry
from ..config import BatchesProviderConfig
from ..domain.outages import is_dependency_outage, log_failure
from ..domain.ownership import acting_as
from ..stack import DeleteFileRequest, ResourceNotFoundError, get_logger
from ..storage.leases import wait_at_most
from ..storage.retention import ExpiringFile, Removed, RetentionStore

logger = get_logger(name=__name__, category="providers")

SWEEP_ROWS = 500  # batches or files per step
DAY_SECONDS = 86400.0
# A file whose delete keeps failing (its owner lost the right to delete it, say) is given up after
# this many tries, about two hours: its row must not stay in the table for ever.
MAX_DELETE_TRIES = 8
FIRST_RETRY_SECONDS = 60.0


@dataclass
class Housekeeper:
    store: RetentionStore
    files: Any  # the stack's Files API
    config: BatchesProviderConfig
    clock: Callable[[], float] = time.time
    _ends_recorded: bool = False  # this process has given every ended batch its ended time
    _delete_tries: dict[str, int] = field(default_factory=dict)  # failed deletes by file id, in this process

    async def run(self, stopping: asyncio.Event) -> None:
        failing = False
        while not stopping.is_set():
            try:
                await self.sweep()
                failing = False
            except Exception as exc:
                if not failing:  # once per run of failures: an outage must not flood the log
                    log_failure(logger, "Cannot sweep the store; trying again later", exc)
                failing = True
            await wait_at_most(stopping, self.config.sweep_interval_seconds)

    async def sweep(self) -> Removed:
        """One pass: everything due now; what it removed."""
        started = time.perf_counter()
        if not self._ends_recorded:
            await self._record_missing_ends()
        files, outage = await self._expire_files()
        removed = await self._remove_due()
        telemetry.swept(removed.rows, removed.bytes, files)
        if removed.rows or files:
            logger.info(
                "Swept the store",
                rows=removed.rows,
                bytes=removed.bytes,
                files=files,
                seconds=round(time.perf_counter() - started, 3),
            )
        if outage is not None:  # run() logs it (once while it lasts); the files wait for the next pass
            raise outage
        return removed

    async def _record_missing_ends(self) -> None:
        """Once per process: batches ended without an ended time are written from this release on
        with one, so only those of earlier releases lack it, and none is added later."""
        while await self.store.record_missing_ends(self.clock(), SWEEP_ROWS):
            pass
        self._ends_recorded = True

    async def _remove_due(self) -> Removed:
        """Records past their retention, then what ended batches left behind."""
        removed = Removed()
        days = self.config.retention_days
        while days:  # None or 0: kept forever
            step = await self.store.remove_ended_before(self.clock() - days * DAY_SECONDS, SWEEP_ROWS)
            removed = Removed(removed.rows + step.rows, removed.bytes + step.bytes)
            if step.rows == 0:
                break
        while (step := await self.store.remove_leftovers(SWEEP_ROWS)).rows:
            removed = Removed(removed.rows + step.rows, removed.bytes + step.bytes)
        return removed

    async def _expire_files(self) -> tuple[int, Exception | None]:
        """Delete the files due now; how many, and the outage that ended the deletes early, if one did."""
        deleted = 0
        while due := await self.store.files_due(self.clock(), SWEEP_ROWS):
            for expiring in due:
                try:
                    deleted += await self._expire(expiring)
                except Exception as exc:
                    if not is_dependency_outage(exc):
                        raise
                    return deleted, exc  # the Files API (or its store) is out: no file is to blame
        return deleted, None

    async def _expire(self, expiring: ExpiringFile) -> int:
        """Delete one file (1), or find it gone (0); a failure other than an outage is tried again later."""
        with acting_as(expiring.owner):
            try:
                await self.files.openai_delete_file(DeleteFileRequest(file_id=expiring.file_id))
                deleted = 1
            except ResourceNotFoundError:  # deleted by its owner, or by another process's sweep
                deleted = 0
            except Exception as exc:
                if is_dependency_outage(exc):
                    raise
                await self._delete_failed(expiring, exc)
                return 0
        self._delete_tries.pop(expiring.file_id, None)
        await self.store.file_expired(expiring.file_id)
        return deleted

    async def _delete_failed(self, expiring: ExpiringFile, exc: Exception) -> None:
        """Make the file due again later, or give it up after MAX_DELETE_TRIES: one log line either way."""
        tries = self._delete_tries.pop(expiring.file_id, 0) + 1
        giving_up = tries >= MAX_DELETE_TRIES
        delay = FIRST_RETRY_SECONDS * 2 ** (tries - 1)
        logger.warning(
            "Giving up deleting an expired result file"
            if giving_up
            else "Cannot delete an expired result file; trying again later",
            file_id=expiring.file_id,
            batch_id=expiring.batch_id,
            tries=tries,
            retry_seconds=None if giving_up else delay,
            error=f"{type(exc).__name__}: {exc}"[:300],
        )
        if giving_up:
            await self.store.file_expired(expiring.file_id)
            return
        self._delete_tries[expiring.file_id] = tries
        await self.store.retry_file_at(expiring.file_id, self.clock() + delay)
