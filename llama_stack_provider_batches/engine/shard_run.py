"""Running one shard of a batch (shards.py): its requests that have no stored result yet, each sent
once the scheduler (scheduler.py) grants it a slot, so that the batch gets its fair share of the
model's capacity and no more.

The same code runs a shard for its batch's own job (job.py) and for a helper in another process
(runner.py). A shard run keeps its shard's lease with a heartbeat, which also brings the batch's
status: a cancel made anywhere, or the batch's job ending it, stops dispatching within about a
second. It stops likewise at the batch's `expires_at`, at a server stop, and at once, writing
nothing more, when its lease is lost.
Finished results go to the store as they come (result_log.py); a request counts as done once its
result is stored, and a shard whose every request has a stored result is released `done`.
"""

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import BaseModel

from ..domain.outages import is_dependency_outage
from ..domain.results import ResultEntry, Tally, decode_results
from ..requests.endpoints import DeadlineReached, RequestSender, result_for_exception, result_for_response
from ..requests.input_file import InputIndex, RequestLine
from ..stack import BatchObject, get_logger
from ..storage.leases import STORE_CALL_SECONDS, finish_or_cancel, keep_lease
from ..storage.shards import ShardLease
from ..storage.store import BatchStore, LeaseLostError
from .result_log import ResultLog, Unstored
from .scheduler import Scheduler, Slot

logger = get_logger(name=__name__, category="providers")


# A shard run stops dispatching when its batch is cancelled, or is being ended by its job while shards
# still run (a batch that gives up moves to `finalizing` first: job.py): no request of a batch that is
# ending goes out anywhere.
SHARD_STOP_STATUSES = frozenset({"cancelling", "finalizing"})


class Stop(Enum):
    """Why dispatching ended before every request ran."""

    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"  # another process runs the shard now


@dataclass
class JobSettings:
    """The parts of the provider config a job needs."""

    grace_seconds: float
    shutdown_grace_seconds: float
    lease_seconds: float = 15.0
    requests_per_shard: int = 250
    max_at_risk_requests: int = 100  # per shard run: requests in flight or with results unstored (result_log.py)
    token_limit: Callable[[str], int | None] | None = None  # per model; None: no token quota, no estimates
    token_encodings: Mapping[str, str] = field(default_factory=dict)  # model id -> tiktoken encoding


@dataclass
class ShardRun:
    """Runs the requests of one shard that have no stored result."""

    lease: ShardLease
    batch: BatchObject
    index: InputIndex
    store: BatchStore
    sender: RequestSender
    settings: JobSettings
    cancel_requested: asyncio.Event  # set by the batch's job, or by this run's heartbeat
    stopping: asyncio.Event
    scheduler: Scheduler
    owner: str  # the batch owner's scope (ownership.scope_of): whose share the requests take
    clock: Callable[[], float] = time.time
    batch_lease_lost: asyncio.Event | None = None  # the batch's job lost its lease: abandon the shard too
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)
    all_sent: asyncio.Event = field(default_factory=asyncio.Event)  # no request of the shard is left to send
    unstored: Unstored = field(default_factory=Unstored)  # shared by the batch's runs in its job
    _done: bytearray = field(default_factory=bytearray)
    _log: ResultLog | None = None

    async def run(self) -> Stop | None:
        """Run the shard; release its lease (`done` if every request has a result); return why it
        stopped early, if it did."""
        finished = asyncio.Event()
        renew = lambda: self.store.shards.renew(self.lease, self.settings.lease_seconds)  # noqa: E731
        keeper = keep_lease(
            renew,
            self.settings.lease_seconds,
            self.lease_lost,
            finished,
            self.cancel_requested.set,
            self.lease.batch_id,
            self._trip_on_outage,
            SHARD_STOP_STATUSES,
        )
        heartbeat = asyncio.create_task(keeper, name=f"lease:{self.lease.batch_id}:s{self.lease.shard}")
        watcher = asyncio.create_task(self._follow_batch_lease())
        stop: Stop | None = Stop.LEASE_LOST
        try:
            self._log = await self._open_result_log()
            stop = await self._execute()
        except LeaseLostError:  # the shard's progress could not be written: another process has it
            self.lease_lost.set()
            stop = Stop.LEASE_LOST
        finally:
            self.all_sent.set()
            if self._log is not None:
                self._log.forget()
            finished.set()
            watcher.cancel()
            await finish_or_cancel(heartbeat, STORE_CALL_SECONDS)
            if not self.lease_lost.is_set():
                await self.store.shards.release(self.lease, done=stop is None and all(self._done))
            logger.info(
                "Shard run ended",
                batch_id=self.lease.batch_id,
                shard=self.lease.shard,
                requests=self.lease.end - self.lease.first,
                stop=stop.value if stop else "done",
                process=os.getpid(),
            )
        return stop

    def _trip_on_outage(self, exc: BaseException) -> None:
        """The store failed to renew the lease: while it is out, send nothing whose result could not be stored."""
        if is_dependency_outage(exc):
            self.sender.gate.trip(exc)

    async def _follow_batch_lease(self) -> None:
        if self.batch_lease_lost is not None:
            await self.batch_lease_lost.wait()
            self.lease_lost.set()

    def _past_deadline(self) -> bool:
        return self.batch.expires_at is not None and self.clock() >= self.batch.expires_at

    async def _open_result_log(self) -> ResultLog:
        """The shard's result log, with the requests whose results are stored (a resumed shard)
        marked done so that they do not run again."""
        first, end = self.lease.first, self.lease.end
        self._done = bytearray(end - first)
        kept: list[ResultEntry] = []  # a request found twice ran twice: its first result counts
        async for chunk in self.store.results.read(self.lease.batch_id, self.lease.shard):
            for entry in decode_results(chunk):
                if first <= entry.position < end and not self._done[entry.position - first]:
                    self._done[entry.position - first] = 1
                    kept.append(entry)
        tally = await asyncio.to_thread(Tally.of, kept) if kept else Tally()
        chunks_of_epoch = await self.store.results.count(self.lease.batch_id, self.lease.shard, self.lease.epoch)
        return ResultLog(
            self.store,
            self.lease,
            stored_chunks=chunks_of_epoch,
            tally=tally,
            gate=self.sender.gate,
            max_at_risk=self.settings.max_at_risk_requests,
            unstored=self.unstored,
        )

    async def _execute(self) -> Stop | None:
        """Run every request without a stored result; return why it stopped early, if it did."""
        in_flight: set[asyncio.Task[None]] = set()
        first = self.lease.first

        async def run_one(position: int, request: RequestLine, slot: Slot, model: str) -> None:
            try:
                response = await self.sender.send(
                    self.batch.endpoint, request.body, slot, self.stopping, self._past_deadline, model
                )
            except DeadlineReached:
                return  # it was never sent: it gets its `batch_expired` line at the end
            except Exception as exc:
                if self.stopping.is_set():
                    return  # perhaps the server going down, not the request: it runs again after the restart
                self._record_failure(position, result_for_exception(request, exc))
            else:
                self._record_success(position, request.custom_id, response)

        async def dispatch() -> None:
            for position in range(first, self.lease.end):
                if self._done[position - first]:
                    continue
                # No request whose result could not be stored: the batch's requests in flight here
                # (its shard runs share the flow) and its results unstored are bounded together.
                await log.wait_for_room(flow.in_flight)
                request = self.index.request(position)
                # A moderation naming no model runs the stack's default, which validation stored as the batch's.
                model = request.model or self.batch.model or self.batch.endpoint
                slot = await self.scheduler.acquire(flow, model)
                if self._stop_asked() or self._past_deadline():  # their waiters may not have run yet
                    slot.release()
                    break
                task = asyncio.create_task(run_one(position, request, slot, model))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                # A callback, not a `finally` in run_one: a task cancelled before it starts runs none of its code.
                task.add_done_callback(lambda _, slot=slot: slot.release())
            self.all_sent.set()  # the job may start its next shard beside this one's last requests
            while in_flight:
                # Not gather: cancelling this task must leave requests in flight their grace period.
                finished, _ = await asyncio.wait(set(in_flight))
                for task in finished:
                    task.result()  # re-raise what went wrong in one, if anything did

        log = self._log
        assert log is not None
        with self.scheduler.flow(self.lease.batch_id, self.owner) as flow:
            return await self._supervise(dispatch, in_flight, log)

    async def _supervise(
        self, dispatch: Callable[[], Coroutine[Any, Any, None]], in_flight: set[asyncio.Task[None]], log: ResultLog
    ) -> Stop | None:
        """Run the dispatcher until it ends or something stops it; leave requests in flight their grace."""
        dispatcher = asyncio.create_task(dispatch())
        cancelled = asyncio.create_task(self.cancel_requested.wait())
        stopping = asyncio.create_task(self.stopping.wait())
        lost = asyncio.create_task(self.lease_lost.wait())
        expiry = asyncio.create_task(asyncio.sleep(max(0, (self.batch.expires_at or 0) - self.clock())))
        writer = asyncio.create_task(log.write_continuously())
        try:
            waiting = {dispatcher, cancelled, stopping, lost, expiry, writer}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()  # the writer only ends on an error (the store's, or LeaseLostError): raise it
            if self.lease_lost.is_set():
                return Stop.LEASE_LOST  # its results would be written for nothing: abandon the requests
            if dispatcher.done():
                dispatcher.result()  # re-raise what went wrong, if anything did
            if dispatcher.done() and not self._stop_asked() and all(self._done):
                return None
            # The events, not their waiter tasks: a waiter may not have run yet when the dispatcher stops.
            stop = Stop.SHUTDOWN if self.stopping.is_set() else Stop.CANCELLED
            if not self.stopping.is_set() and not self.cancel_requested.is_set():
                stop = Stop.EXPIRED  # the only other reason for the dispatcher to stop with requests left
            dispatcher.cancel()
            grace = self.settings.shutdown_grace_seconds if stop is Stop.SHUTDOWN else self.settings.grace_seconds
            await self._let_in_flight_finish(in_flight, grace)
            return stop
        finally:
            helpers = (dispatcher, cancelled, stopping, lost, expiry, writer)
            for task in (*helpers, *in_flight):
                task.cancel()
            # Awaited, so that what a helper raised as it ended (the writer's LeaseLostError after a
            # revoke, say) is retrieved here rather than logged as "Task exception was never retrieved".
            await asyncio.gather(*helpers, *in_flight, return_exceptions=True)
            if not self.lease_lost.is_set():
                await log.flush()
                await log.report_progress()

    def _stop_asked(self) -> bool:
        return self.cancel_requested.is_set() or self.stopping.is_set() or self.lease_lost.is_set()

    async def _let_in_flight_finish(self, in_flight: set[asyncio.Task[None]], grace_seconds: float) -> None:
        """Give requests in flight a bounded time to finish, then abandon them."""
        if in_flight:
            _, abandoned = await asyncio.wait(set(in_flight), timeout=grace_seconds)
            for task in abandoned:
                task.cancel()
            await asyncio.gather(*abandoned, return_exceptions=True)

    def _record_success(self, position: int, custom_id: str, response: BaseModel) -> None:
        ok, line, input_tokens, output_tokens = result_for_response(custom_id, response)
        if ok:
            self._log.add_success(ResultEntry(position, True, line), input_tokens, output_tokens)  # type: ignore[union-attr]
        else:  # an answer that cannot be written as a result line is this request's error, not the batch's
            self._log.add_failure(ResultEntry(position, False, line))  # type: ignore[union-attr]
        self._done[position - self.lease.first] = 1

    def _record_failure(self, position: int, line: str) -> None:
        self._log.add_failure(ResultEntry(position, False, line))  # type: ignore[union-attr]
        self._done[position - self.lease.first] = 1
