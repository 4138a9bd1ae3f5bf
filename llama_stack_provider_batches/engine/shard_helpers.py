"""Helping other processes' batches: a slot this process has free runs a shard of a batch whose job
runs elsewhere (shards.py), so that one large batch uses every worker and replica with capacity.

A helper claims the oldest free shard of a running batch it does not run already, reads the batch's
input as the batch's owner, runs the shard (shard_run.py) and releases it. It never finalizes: the
batch's own job does that once every shard is done. Shards of batches created with per-request
credentials are never offered to helpers (the credentials exist only in the creating process). A
batch whose shard run fails here is left alone for a pause that doubles per failure: its own job
runs its shards meanwhile, and ends it under its bounded attempts if the failure is the batch's.
"""

import asyncio
import contextvars
import time
from collections import OrderedDict
from collections.abc import Callable

from ..domain.lifecycle import is_terminal
from ..domain.outages import log_failure
from ..domain.ownership import acting_as, scope_of
from ..requests.endpoints import RequestSender
from ..requests.input_file import InputIndex
from ..requests.input_reader import read_requests
from ..stack import BatchObject, Files, get_logger
from ..storage.leases import STORE_CALL_SECONDS
from ..storage.shards import ShardLease
from ..storage.store import BatchStore
from .scheduler import Scheduler
from .shard_run import JobSettings, ShardRun

logger = get_logger(name=__name__, category="providers")

KEPT_INPUTS = 4  # parsed input files kept for the next shards of the batches helped most recently,
KEPT_INPUT_BYTES = 200 * 1024 * 1024  # and their bytes at most (the one in use is kept whatever its size)
FAILURE_PAUSE_SECONDS = 1.0  # after a failed shard run, how long before this process helps that batch again
MAX_FAILURE_PAUSE_SECONDS = 60.0  # the pause doubles per failure up to this


class ShardHelpers:
    """The shard runs this process does for batches it does not run itself."""

    def __init__(
        self,
        store: BatchStore,
        sender: RequestSender,
        files: Files,
        settings: JobSettings,
        scheduler: Scheduler,
        holder: str,
        stopping: asyncio.Event,
        on_done: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sender = sender
        self._files = files
        self._settings = settings
        self._scheduler = scheduler
        self._holder = holder
        self._stopping = stopping
        self._on_done = on_done
        self._clock = clock
        self._tasks: dict[asyncio.Task[None], str] = {}  # each run and its batch id
        # Parsed inputs by batch id, most recently used last: a batch's next shard does not read and
        # parse its whole file again (files never change). Bounded: each holds the file's bytes.
        self._inputs: OrderedDict[str, InputIndex] = OrderedDict()
        # Batches whose shard run failed here, and when this process may try one of them again.
        self._failing: dict[str, tuple[float, float]] = {}  # batch id -> (retry at, pause)

    def __len__(self) -> int:
        return len(self._tasks)

    def batch_ids(self) -> set[str]:
        return set(self._tasks.values())

    async def fill(self, free: int, busy: set[str]) -> None:
        """Start up to `free` shard runs, for batches not in `busy` (run here already)."""
        now = time.monotonic()
        self._failing = {batch_id: retry for batch_id, retry in self._failing.items() if retry[0] > now}
        exclude = set(busy) | self.batch_ids() | set(self._failing)
        for _ in range(free):
            if self._stopping.is_set():
                return
            lease = await self._store.shards.claim(
                self._holder, self._settings.lease_seconds, exclude=frozenset(exclude)
            )
            if lease is None:
                self._forget_inputs_but(self.batch_ids())  # no free shard left: keep only what runs
                return
            exclude.add(lease.batch_id)  # one shard of a batch at a time here: its cap holds per process
            # An empty context: the run acts as the batch's owner, never as whoever woke the claim loop.
            name = f"shard:{lease.batch_id}:s{lease.shard}"
            task = asyncio.create_task(self._help(lease), name=name, context=contextvars.Context())
            self._tasks[task] = lease.batch_id
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._on_done()

    async def _help(self, lease: ShardLease) -> None:
        try:
            stored = await self._store.get(lease.batch_id)
            if stored is None or is_terminal(stored.batch.status):
                await self._store.shards.release(lease)
                return
            with acting_as(stored.owner):
                index = await self._input_of(stored.batch)
                run = ShardRun(
                    lease,
                    stored.batch,
                    index,
                    self._store,
                    self._sender,
                    self._settings,
                    asyncio.Event(),
                    self._stopping,
                    self._scheduler,
                    scope_of(stored.owner),
                    self._clock,
                )
                await run.run()
        except Exception as exc:
            # The shard stays not done; whoever claims it next (its batch's job at the latest) runs it,
            # and a batch whose processing keeps failing ends under its job's bounded attempts.
            log_failure(logger, "A shard run for another process's batch failed", exc, batch_id=lease.batch_id)
            _, pause = self._failing.get(lease.batch_id, (0.0, FAILURE_PAUSE_SECONDS / 2))
            pause = min(2 * pause, MAX_FAILURE_PAUSE_SECONDS)
            self._failing[lease.batch_id] = (time.monotonic() + pause, pause)
            try:
                await self._store.shards.release(lease)
            except Exception as release_error:
                message = "Cannot release a shard's lease; it runs out"
                log_failure(logger, message, release_error, batch_id=lease.batch_id)

    async def _input_of(self, batch: BatchObject) -> InputIndex:
        """The batch's parsed input: kept from an earlier shard of it, or read now (as its owner)."""
        index = self._inputs.pop(batch.id, None)
        if index is None:
            index = await read_requests(self._files, batch)
        self._inputs[batch.id] = index
        while len(self._inputs) > 1 and (len(self._inputs) > KEPT_INPUTS or self._kept_bytes() > KEPT_INPUT_BYTES):
            self._inputs.popitem(last=False)
        return index

    def _kept_bytes(self) -> int:
        return sum(len(kept.content) for kept in self._inputs.values())

    def _forget_inputs_but(self, batch_ids: set[str]) -> None:
        for batch_id in [b for b in self._inputs if b not in batch_ids]:
            del self._inputs[batch_id]

    async def stop(self) -> None:
        """Wait for the runs to stop (`stopping` is set): they store their results and release their shards."""
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._settings.shutdown_grace_seconds + STORE_CALL_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
