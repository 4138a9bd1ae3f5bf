"""The execution engine: claims batches from the store and runs their jobs (job.py) in the
background of the server's event loop.

A claim loop starts jobs as long as fewer than `max_concurrent_batches` run here (by default, up to
config.BATCHES_SIDE_BY_SIDE side by side), taking first the waiting batches of the owners with the
least running work (sql_store.py); a quarter of the slots is kept for owners with no batch running
here, so that one user's many batches cannot keep another's first one waiting. The jobs share the
model capacity through the scheduler (scheduler.py), whose cap the loop governor (governor.py)
tightens while the serving loop lags or serves HTTP requests. The claim loop looks at once when
this server creates a batch, and every POLL_SECONDS otherwise: that is how batches left by an
earlier run (a restart) or by a dead replica (once its leases expire) are resumed, and how idle
replicas pick up waiting batches. Jobs it starts run as their batch's owner (job.py), in a context
of their own.

Batches created with per-request credentials (never stored) must run here, in their creating
request's context: they are created already leased to this server and park here (parking.py) until
the claim loop gives them a slot, in creation order with every other batch.

While a job runs, its lease is kept by a heartbeat (leases.py); losing it ends the job at once,
without writing anything. A server stop ends every job, leaves each batch in a status it resumes
from and releases its leases, so that another replica can take them over at once.

Poison batches: a job that raises is tried again, a bounded number of times (attempts.py); a batch
that could not even be marked failed is parked here, its lease held and no job run, until the server
stops. Batches that need no work, cancelled ones not running here and waiting ones past their
deadline, are closed without waiting for a slot.
"""

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator

from .. import telemetry
from ..config import BatchesProviderConfig
from ..domain.outages import log_failure
from ..requests.endpoints import RequestSender
from ..requests.resilience import RateLimiter, RetryPolicy
from ..requests.stack_apis import StackAPIs
from ..stack import BatchObject, Files, get_logger
from ..storage.leases import STORE_CALL_SECONDS, finish_or_cancel, keep_lease, server_name, wait_at_most
from ..storage.store import BatchStore, Lease
from .attempts import Ending, JobAttempts
from .governor import LoopGovernor, govern
from .housekeeping import Housekeeper
from .job import BatchJob
from .parking import ParkedLeases
from .scheduler import Scheduler
from .shard_helpers import ShardHelpers
from .shard_run import JobSettings
from .webhook_delivery import WebhookDeliverer

logger = get_logger(name=__name__, category="providers")

# Of the claim loop, while the store cannot be reached: batches resume within seconds of its return.
RETRY_DELAYS_SECONDS = (0.5, 1.0, 2.0)
POLL_SECONDS = 1.0
SWEEP_PASSES = 10  # every tenth look for work, waiting batches past their deadline are expired
SWEEP_BATCHES = 100  # the oldest waiting batches looked at by a sweep (they expire first)


def retry_delay(attempt: int) -> float:
    """The pause before the claim loop's retry number `attempt` (0-based) after a store error."""
    return RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS) - 1)]


class BatchRunner:
    """Claims batches and runs their jobs."""

    def __init__(
        self,
        store: BatchStore,
        config: BatchesProviderConfig,
        apis: StackAPIs,
        files: Files,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sender = RequestSender(
            apis,
            RetryPolicy(config.max_attempts, config.backoff_initial_seconds, config.backoff_max_seconds),
            config.request_timeout_seconds,
            pacer=RateLimiter(config.requests_per_second_per_model) if config.requests_per_second_per_model else None,
            lookup_seconds=config.model_lookup_seconds,
        )
        self._files = files
        self._apis = apis
        self._clock = clock
        self._config = config
        self.scheduler = Scheduler(
            config.capacity_per_model,
            config.capacity_by_model,
            config.max_in_flight_requests,
            config.max_concurrent_requests_per_batch,
        )
        target_ms = config.interactive_lag_target_ms
        self._governor: LoopGovernor | None = govern(self.scheduler, target_ms) if target_ms is not None else None
        self._governing: asyncio.Task[None] | None = None
        self.deliverer: WebhookDeliverer | None = None  # webhook events, delivered beside the batches
        self._delivering: asyncio.Task[None] | None = None
        self.housekeeper: Housekeeper | None = None  # retention and expiry, swept beside the batches
        self._sweeping: asyncio.Task[None] | None = None
        self._settings = JobSettings(
            grace_seconds=config.cancel_grace_seconds,
            shutdown_grace_seconds=config.shutdown_grace_seconds,
            lease_seconds=config.lease_seconds,
            requests_per_shard=config.requests_per_shard,
            # Two windows: a window in flight and a window of results being stored, whatever their
            # mix; what runs again after a partition stays within that.
            max_at_risk_requests=2 * config.max_concurrent_requests_per_batch,
            token_limit=config.token_limit if config.max_enqueued_tokens_per_user is not None else None,
            token_encodings=config.token_encodings,
        )
        self.lease_seconds = config.lease_seconds
        self.holder = server_name()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: dict[str, asyncio.Event] = {}
        self._parked = ParkedLeases(store, config.lease_seconds, config.max_waiting_batches_with_credentials)
        self._to_close: set[str] = set()  # batches cancelled here while not running here
        self._passes_since_sweep = SWEEP_PASSES  # the first look sweeps
        self._stopping = asyncio.Event()
        self._attempts = JobAttempts(store, config, self._stopping, self._job, clock)
        self._helpers = ShardHelpers(
            store, self._sender, files, self._settings, self.scheduler, self.holder, self._stopping, self.wake, clock
        )
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
            if self._governor is not None:
                governing = self._governor.run()
                self._governing = asyncio.create_task(governing, name="batches:governor", context=contextvars.Context())
            if self.housekeeper is not None:
                sweeping = self.housekeeper.run(self._stopping)
                self._sweeping = asyncio.create_task(sweeping, name="batches:sweep", context=contextvars.Context())
            if self.deliverer is not None:
                delivering = self.deliverer.run(self._stopping)
                self._delivering = asyncio.create_task(
                    delivering, name="batches:webhooks", context=contextvars.Context()
                )

    def wake(self) -> None:
        """Look for work now (a batch was just created here, or a slot is free)."""
        self._passes_wanted += 1
        self._wake.set()

    @contextlib.contextmanager
    def room_to_park(self) -> Iterator[None]:
        """Hold a place for a batch with per-request credentials while it is created; refuse (HTTP 429)
        when too many already wait here. Taken before the first await, so concurrent creates count."""
        with self._parked.room():
            yield

    def adopt(self, lease: Lease, batch: BatchObject) -> None:
        """Run a batch created here already leased, in the current (creating request's) context, when its turn comes."""
        self._parked.wait_here(lease, batch, contextvars.copy_context())
        self.wake()

    def request_cancel(self, batch_id: str) -> None:
        """Tell a batch running here to stop dispatching; it then writes its partial results. A batch
        not running here is closed at the next look for work, without waiting for a slot."""
        if event := self._cancel_requested.get(batch_id):
            event.set()
        else:
            self._to_close.add(batch_id)
            self.wake()

    def running(self) -> list[str]:
        """The ids of the batches whose jobs run here."""
        return list(self._tasks)

    async def wait_idle(self) -> None:
        """Wait until every claimable batch has been claimed and every job here has stopped."""
        while (
            self._tasks
            or len(self._helpers)
            or (self._claim_loop is not None and self._passes_done < self._passes_wanted)
        ):
            if self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            else:
                await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        """Stop every job without changing any batch's status, so that it can be resumed.

        Running jobs stop dispatching, give their requests in flight `shutdown_grace_seconds`, store
        every result they have, and release their leases; so do parked batches.
        """
        if self._stopping.is_set():  # stopped already (before the stack's inference: startup.stop_before)
            return
        self._stopping.set()
        self._wake.set()
        if self.deliverer is not None:
            self.deliverer.wake()  # it polls every second: it sees the stop at once
        if self._governing is not None:
            self._governing.cancel()
            await asyncio.gather(self._governing, return_exceptions=True)
        if self._claim_loop is not None:
            await finish_or_cancel(self._claim_loop, STORE_CALL_SECONDS)
        for background in (self._delivering, self._sweeping):
            if background is not None:
                await finish_or_cancel(background, STORE_CALL_SECONDS)
        await self._helpers.stop()
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._settings.shutdown_grace_seconds + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._parked.release_all(self._release)
        await self._sender.routes.aclose()

    # --- claiming -------------------------------------------------------------------------------

    async def _claim_forever(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            wanted = self._passes_wanted
            self._wake.clear()
            try:
                self._to_close |= await self._parked.renew()
                await self._close_without_slots()
                await self._fill_free_slots()
            except Exception as exc:
                delay = retry_delay(attempt)
                if attempt == 0:  # once per outage: it must not flood the log
                    log_failure(logger, "Cannot claim batches; retrying", exc, retry_in=delay)
                attempt += 1
                await wait_at_most(self._wake, delay)
                continue
            attempt = 0
            self._passes_done = wanted
            await wait_at_most(self._wake, POLL_SECONDS)

    async def _fill_free_slots(self) -> None:
        """Start the oldest batches, claimable or parked here, while slots are free; then help other
        processes' batches with the slots left (shard_helpers.py)."""
        await self._start_batches()
        free = self._free_slots() - self._config.slots_for_new_owners()  # those stay free for the next owner
        if free > 0 and not self._parked.waiting():
            await self._helpers.fill(free, busy=set(self._tasks))

    def _free_slots(self) -> int:
        return self._config.batches_here() - len(self._tasks) - len(self._helpers)

    async def _claim(self, free: int) -> list[Lease]:
        """Up to `free` waiting batches; the slots kept for new owners only for owners with none running here."""
        for_anyone = max(0, free - self._config.slots_for_new_owners())
        leases = await self._store.claim(self.holder, for_anyone, self.lease_seconds) if for_anyone else []
        if len(leases) == for_anyone < free:  # fewer than asked for: nothing else waits, not even a new owner's
            leases += await self._store.claim(self.holder, free - len(leases), self.lease_seconds, newcomers_only=True)
        return leases

    async def _start_batches(self) -> None:
        free = self._free_slots()
        if free <= 0:
            return
        claimed = []
        for lease in await self._claim(free):
            if lease.batch_id in self._tasks:
                # Its lease ran out while its job runs here (a stalled renewal): that job stops at its
                # next renewal, and the batch is claimed again after it.
                await self._release(lease)
            elif parked := self._parked.get(lease.batch_id):  # a parked lease ran out: keep the new one
                parked.lease = lease
            else:
                claimed.append(lease)
        waiting = self._parked.waiting()
        if not waiting:
            for lease in claimed:
                self._launch(lease)
            return
        # Parked batches take their turn in creation order with the others: no queue jumping.
        candidates = [(await self._created_at(lease), lease, None) for lease in claimed]
        candidates += [(parked.created_at, parked.lease, parked.context) for parked in waiting]
        candidates.sort(key=lambda candidate: candidate[0])
        for _, lease, context in candidates[:free]:
            self._parked.pop(lease.batch_id)
            self._launch(lease, context)
        for _, lease, context in candidates[free:]:
            if context is None:  # claimed but not started: let it be claimed again
                await self._release(lease)

    async def _close_without_slots(self) -> None:
        """Close, without waiting for a slot, the batches that need no work: cancelled ones not running
        here, and, every SWEEP_PASSES looks, waiting ones past their deadline (they expire unrun)."""
        to_close, self._to_close = self._to_close, set()
        self._passes_since_sweep += 1
        if self._passes_since_sweep >= SWEEP_PASSES:
            self._passes_since_sweep = 0
            telemetry.set_status_counts(await self._store.unfinished_by_status())
            if self._settings.token_limit is not None:
                telemetry.set_enqueued_tokens(await self._store.shards.tokens.enqueued())
            now = self._clock()
            to_close.update(self._parked.past_deadline(now))
            for batch_id in await self._store.waiting_ids(SWEEP_BATCHES):
                batch = await self._batch_or_none(batch_id)
                if batch and (batch.status == "cancelling" or (batch.expires_at or now + 1) <= now):
                    to_close.add(batch_id)
        for batch_id in to_close:
            if batch_id in self._tasks:
                continue
            parked = self._parked.pop(batch_id)
            if parked is not None and parked.context is not None:
                self._launch(parked.lease, parked.context)
            elif parked is None and (lease := await self._store.claim_batch(batch_id, self.holder, self.lease_seconds)):
                self._launch(lease)
            elif parked is not None:  # set aside: it stays so
                self._parked.put_back(parked)

    async def _created_at(self, lease: Lease) -> int:
        batch = await self._batch_or_none(lease.batch_id)
        return batch.created_at if batch else 0

    async def _batch_or_none(self, batch_id: str) -> BatchObject | None:
        """The batch, or None if it is missing or its record cannot be read: one bad record must not
        stop the claim loop, which every other batch needs (its job fails, a bounded number of times)."""
        try:
            stored = await self._store.get(batch_id)
        except Exception as exc:
            log_failure(logger, "Cannot read a batch record", exc, batch_id=batch_id)
            return None
        return stored.batch if stored else None

    def _launch(self, lease: Lease, context: contextvars.Context | None = None) -> None:
        batch_id = lease.batch_id
        if self._stopping.is_set() or batch_id in self._tasks:
            # Not to run now: parked, so that the stop releases its lease with the others.
            if batch_id not in self._tasks:
                self._parked.set_aside(lease)
            return
        self._cancel_requested[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._run(lease), name=f"batch:{batch_id}", context=context)
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._forget(batch_id, task))

    def _forget(self, batch_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(batch_id) is not task:
            return
        self._tasks.pop(batch_id, None)
        self._cancel_requested.pop(batch_id, None)
        self.wake()  # a slot is free

    # --- running --------------------------------------------------------------------------------

    async def _run(self, lease: Lease) -> None:
        lost, finished = asyncio.Event(), asyncio.Event()
        on_cancelling = lambda: self.request_cancel(lease.batch_id)  # noqa: E731
        renew = lambda: self._store.renew(lease, self.lease_seconds)  # noqa: E731
        keeper = keep_lease(renew, self.lease_seconds, lost, finished, on_cancelling, lease.batch_id)
        heartbeat = asyncio.create_task(keeper, name=f"lease:{lease.batch_id}")
        try:
            if await self._attempts.run(lease, lost) is Ending.SET_ASIDE:
                self._parked.set_aside(lease)
        finally:
            finished.set()
            await finish_or_cancel(heartbeat, STORE_CALL_SECONDS)
            if lost.is_set():
                logger.warning("Lease lost; batch left to the server holding it now", batch_id=lease.batch_id)
            elif lease.batch_id not in self._parked:
                await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        try:
            await self._store.release(lease)
        except Exception as exc:  # it expires on its own
            log_failure(logger, "Cannot release a lease", exc, batch_id=lease.batch_id)

    def _job(self, lease: Lease, lost: asyncio.Event) -> BatchJob:
        return BatchJob(
            lease=lease,
            store=self._store,
            sender=self._sender,
            files=self._files,
            apis=self._apis,
            settings=self._settings,
            cancel_requested=self._cancel_requested[lease.batch_id],
            stopping=self._stopping,
            lease_lost=lost,
            scheduler=self.scheduler,
            holder=self.holder,
            clock=self._clock,
        )
