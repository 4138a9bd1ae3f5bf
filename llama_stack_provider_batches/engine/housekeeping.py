"""The sweep that keeps storage bounded, run by every process every `sweep_interval_seconds`.

Each pass, in bounded steps (SWEEP_ROWS at a time, repeated until nothing is due):
- result files whose `output_expires_after` has passed are deleted through the Files API, as their
  owner, whether or not the Files provider deletes expired files itself (localfs does not);
- batch records whose retention (`retention_days` after they ended) has passed are removed, with
  their idempotency keys and anything left of their stored work;
- shard rows and result chunks left behind for batches that have ended (a process that crashed
  while one was being ended, or lost its lease) are removed.
Processes sweeping at the same time do no harm: every removal is a DELETE of rows that may already
be gone, and a file deleted twice is "not found" the second time.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import telemetry
from ..config import BatchesProviderConfig
from ..domain.outages import log_failure
from ..domain.ownership import acting_as
from ..stack import DeleteFileRequest, ResourceNotFoundError, get_logger
from ..storage.leases import wait_at_most
from ..storage.retention import Removed, RetentionStore

logger = get_logger(name=__name__, category="providers")

SWEEP_ROWS = 500  # batches or files per step
DAY_SECONDS = 86400.0


@dataclass
class Housekeeper:
    store: RetentionStore
    files: Any  # the stack's Files API
    config: BatchesProviderConfig
    clock: Callable[[], float] = time.time

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
        files = await self._expire_files()
        removed = Removed()
        days = self.config.retention_days
        while days:  # None or 0: kept forever
            step = await self.store.remove_ended_before(self.clock() - days * DAY_SECONDS, SWEEP_ROWS)
            removed = Removed(removed.rows + step.rows, removed.bytes + step.bytes)
            if step.rows == 0:
                break
        while (step := await self.store.remove_leftovers(SWEEP_ROWS)).rows:
            removed = Removed(removed.rows + step.rows, removed.bytes + step.bytes)
        telemetry.swept(removed.rows, removed.bytes, files)
        if removed.rows or files:
            logger.info(
                "Swept the store",
                rows=removed.rows,
                bytes=removed.bytes,
                files=files,
                seconds=round(time.perf_counter() - started, 3),
            )
        return removed

    async def _expire_files(self) -> int:
        deleted = 0
        while due := await self.store.files_due(self.clock(), SWEEP_ROWS):
            for expiring in due:
                with acting_as(expiring.owner):
                    try:
                        await self.files.openai_delete_file(DeleteFileRequest(file_id=expiring.file_id))
                        deleted += 1
                    except ResourceNotFoundError:  # deleted by its owner, or by another process's sweep
                        pass
                await self.store.file_expired(expiring.file_id)
        return deleted
