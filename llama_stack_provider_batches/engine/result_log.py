"""The durable log of one shard's results: finished results go to the store in chunks as they come.

A result is added the moment its request finishes; a writer task stores everything added so far as
one chunk, then waits at least MIN_FLUSH_INTERVAL_SECONDS before the next write (group commit),
unless the dispatcher waits for room (`wait_for_room`): then it writes at once.
Under load a chunk carries the results of one interval; when results trickle in, each is stored
at once. A request counts as done, in `request_counts`, only once its result is stored: after a
crash, the requests to repeat are those in flight and those of at most one unwritten interval.
Chunks are written under the shard's lease epoch (store.ResultChunks), numbered on from
`stored_chunks`; the tally of the stored results goes into the shard's row, whose sums are the
batch's progress (shards.py).

While the store is out (outages.py), the writer keeps the chunk it could not write and writes that
same chunk again once the gate opens (a write may have gone through unacknowledged: the same
number must hold the same results); it trips the gate, so that no new request is sent meanwhile.
"""

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable

from .. import telemetry
from ..domain.outages import DependencyGate, is_dependency_outage
from ..domain.results import ResultEntry, Tally
from ..storage.shards import ShardLease
from ..storage.store import BatchStore, LeaseLostError

MIN_FLUSH_INTERVAL_SECONDS = 0.05
PROGRESS_INTERVAL_SECONDS = 0.5


class Unstored:
    """The results not yet stored of one batch's result logs in this process (a job runs two shards
    side by side at their boundary, and the bound is the batch's): the sum of the logs' own counts,
    so that a log dropped with results it could not store (its lease lost) leaves nothing behind."""

    def __init__(self) -> None:
        self.logs: weakref.WeakSet[ResultLog] = weakref.WeakSet()  # a log that is gone counts no more
        self.stored = asyncio.Event()  # set when some were stored or dropped: a waiting dispatcher looks again
        self.waiting = asyncio.Event()  # a dispatcher waits for room: writers write without a pause

    @property
    def count(self) -> int:
        return sum(log.unstored for log in self.logs)


class ResultLog:
    """Buffers a shard's finished results and stores them; keeps the tally of the stored ones."""

    def __init__(
        self,
        store: BatchStore,
        lease: ShardLease,
        stored_chunks: int = 0,
        tally: Tally | None = None,
        clock: Callable[[], float] = time.monotonic,
        gate: DependencyGate | None = None,
        max_at_risk: int = 100,
        unstored: Unstored | None = None,
    ) -> None:
        self._store = store
        self._max_at_risk = max_at_risk
        self._batch_unstored = unstored or Unstored()
        self._batch_unstored.logs.add(self)
        self._gate = gate or DependencyGate()
        self._unwritten: tuple[list[ResultEntry], Tally] | None = None  # a chunk whose write failed
        self._lease = lease
        self._clock = clock
        self.chunks = stored_chunks
        self.tally = tally or Tally()  # of stored results only
        self._pending: list[ResultEntry] = []
        self._pending_tally = Tally()
        self._added = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._last_progress = -PROGRESS_INTERVAL_SECONDS
        self._unreported = False

    def forget(self) -> None:
        """Leave the batch's count: the run ended, and what it could not store runs again elsewhere."""
        self._batch_unstored.logs.discard(self)
        self._batch_unstored.stored.set()

    @property
    def unstored(self) -> int:
        """Results added and not yet stored."""
        return len(self._pending) + (len(self._unwritten[0]) if self._unwritten is not None else 0)

    async def wait_for_room(self, in_flight: int = 0) -> None:
        """Return once fewer than `max_at_risk` requests of the batch are at risk here: `in_flight`, or
        finished with their result not yet stored (by any of the batch's logs sharing `unstored`). They
        are what runs again if this process is cut off from the store; the bound holds while writes
        hang, and only on the sum, so that a window finishing at once (a fast model answers together)
        does not stop sending while one chunk is written."""
        shared = self._batch_unstored
        while shared.count + in_flight >= self._max_at_risk:
            shared.stored.clear()
            shared.waiting.set()
            try:
                await shared.stored.wait()
            finally:
                shared.waiting.clear()

    def add_success(self, entry: ResultEntry, input_tokens: int, output_tokens: int) -> None:
        self._pending.append(entry)
        self._pending_tally.add_success(input_tokens, output_tokens)
        self._added.set()

    def add_failure(self, entry: ResultEntry) -> None:
        self._pending.append(entry)
        self._pending_tally.add_failure()
        self._added.set()

    async def write_continuously(self) -> None:
        """The writer task: store results as they are added, and report progress, until cancelled."""
        while True:
            # With stored results not yet reported, wake up in time to report them even if no more come.
            wait = None if not self._unreported else max(0.0, self._next_progress_at() - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._added.wait(), wait)
            self._added.clear()
            try:
                # Shielded: cancelling the writer must not drop results it has taken from the buffer.
                await asyncio.shield(self.flush())
            except Exception as exc:
                if not is_dependency_outage(exc):
                    raise
                self._gate.trip(exc)
                await self._gate.wait_open()
                self._added.set()  # try that chunk again
                continue
            if self._unreported and self._clock() >= self._next_progress_at():
                await asyncio.shield(self.report_progress())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_unstored.waiting.wait(), MIN_FLUSH_INTERVAL_SECONDS)

    def _next_progress_at(self) -> float:
        return self._last_progress + PROGRESS_INTERVAL_SECONDS

    async def flush(self) -> None:
        """Store every result added so far: a chunk whose write failed first, as it was, then the rest."""
        async with self._write_lock:
            while self._unwritten is not None or self._pending:
                if self._unwritten is None:
                    self._unwritten = self._pending, self._pending_tally
                    self._pending, self._pending_tally = [], Tally()
                entries, tally = self._unwritten
                lease = self._lease
                started = time.perf_counter()
                # Under the shard's lease: nothing is written once another process has the shard or the
                # batch ended (LeaseLostError, which ends the run).
                await self._store.results.save(
                    lease.batch_id, lease.shard, lease.epoch, self.chunks, entries, token=lease.token
                )
                telemetry.results_committed(time.perf_counter() - started)
                self._unwritten = None
                self._batch_unstored.stored.set()
                self._gate.recovered()
                self.chunks += 1
                self.tally.merge(tally)
                self._unreported = True

    async def report_progress(self) -> None:
        """Write the counts and usage of the stored results into the shard's row."""
        self._last_progress = self._clock()
        self._unreported = False
        if not await self._store.shards.save_progress(self._lease, self.tally):
            raise LeaseLostError(self._lease.batch_id)
