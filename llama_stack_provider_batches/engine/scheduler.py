"""The scheduler: this process's capacity for batch requests, shared fairly between users and batches.

Capacity. At most `capacity(model)` batch requests are in flight from this process to each model
(`capacity_per_model`, or the model's entry in `capacity_by_model`: models usually sit on different
servers), and at most `max_in_flight_requests` to all models together, if that is set. A model's
capacity shrinks while its backend fails transiently and grows back as it answers (AdaptiveLimit):
a failing backend gets less traffic, shared the same way. The loop governor (governor.py) caps the
total further while the serving event loop lags, so that interactive requests come first.

Shares. Every shard run asks for a slot before it sends a request. When a slot is free it goes to
the waiting batch whose owner has the fewest requests in flight on that model (then on all models),
then to the one of that owner's batches with the fewest in flight, then to the one that asked first;
a batch never has more than its cap (`max_concurrent_requests_per_batch`) in flight. Granting one
slot at a time this way divides a model's capacity equally between the owners that have work, an owner's share equally
between their batches, and gives a share nobody uses to whoever waits (max-min fairness): one batch
alone gets everything its cap allows, a small batch created behind a large one starts at the next
free slot, and a batch that ends frees its share at once.

Everything here runs on the event loop and does no I/O: a grant looks at every waiting request
(one per shard run here) and asks the governor for its cap.
"""

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..requests.resilience import AdaptiveLimit


@dataclass
class Flow:
    """One batch's requests in this process: whose they are, how many are in flight, its cap."""

    batch_id: str
    owner: str  # the owner's scope (ownership.scope_of): the unit of fairness between users
    cap: int
    in_flight: int = 0
    runs: int = 0  # shard runs of the batch using the flow here


@dataclass
class ModelPool:
    """One model's capacity here, and its requests in flight by owner."""

    limit: AdaptiveLimit
    in_flight: int = 0
    by_owner: Counter[str] = field(default_factory=Counter)

    @property
    def free(self) -> bool:
        return self.in_flight < int(self.limit.limit)


@dataclass
class Waiter:
    flow: Flow
    model: str
    order: int
    future: asyncio.Future["Slot"]


class Slot:
    """The right to have one request in flight. Released exactly once; tells its model how the request went."""

    def __init__(self, scheduler: "Scheduler", flow: Flow, model: str) -> None:
        self._scheduler = scheduler
        self._flow = flow
        self._model = model
        self._released = False

    def record_success(self) -> None:
        self._scheduler.pool(self._model).limit.record_success()

    def record_transient_failure(self) -> None:
        self._scheduler.pool(self._model).limit.record_transient_failure()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._give_back(self._flow, self._model)


class Scheduler:
    """Grants request slots to batches' shard runs, fairly, within this process's capacity."""

    def __init__(
        self,
        capacity_per_model: int,
        capacity_by_model: dict[str, int] | None = None,
        total_capacity: int | None = None,
        batch_cap: int = 10,
        loop_limit: Callable[[], int] | None = None,
    ) -> None:
        """`loop_limit` returns the governor's current cap on requests in flight (governor.py), if any."""
        self._capacity_per_model = capacity_per_model
        self._capacity_by_model = dict(capacity_by_model or {})
        self._total_capacity = total_capacity
        self._batch_cap = batch_cap
        self.loop_limit = loop_limit
        self._pools: dict[str, ModelPool] = {}
        self._flows: dict[str, Flow] = {}
        self._waiting: list[Waiter] = []
        self._order = itertools.count()
        self._by_owner: Counter[str] = Counter()  # requests in flight on all models, by owner
        self.in_flight = 0

    # --- what shard runs call -------------------------------------------------------------------

    @contextmanager
    def flow(self, batch_id: str, owner: str) -> Iterator[Flow]:
        """Take part in the sharing as batch `batch_id` of `owner` while the block runs."""
        flow = self._flows.get(batch_id)
        if flow is None:
            flow = self._flows[batch_id] = Flow(batch_id, owner, self._batch_cap)
        flow.runs += 1
        try:
            yield flow
        finally:
            flow.runs -= 1
            self._forget_if_idle(flow)

    async def acquire(self, flow: Flow, model: str) -> Slot:
        """Wait for a slot to send one request of `flow` to `model`. Cancelling the wait gives nothing up."""
        waiter = Waiter(flow, model, next(self._order), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            self.grant()
            return await waiter.future
        except BaseException:  # cancelled, or the grant failed: the waiter must not stay behind
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()  # granted just as the wait was cancelled
            raise

    # --- granting -------------------------------------------------------------------------------

    def pool(self, model: str) -> ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            capacity = self._capacity_by_model.get(model, self._capacity_per_model)
            pool = self._pools[model] = ModelPool(AdaptiveLimit(capacity))
        return pool

    def total_limit(self) -> int | None:
        """The cap on requests in flight to all models together, now; None if there is none."""
        limits = [self._total_capacity, self.loop_limit() if self.loop_limit is not None else None]
        present = [limit for limit in limits if limit is not None]
        return min(present) if present else None

    def grant(self) -> None:
        """Give free slots to waiting batches, fairest first, until no slot or no waiter is left."""
        total = self.total_limit()
        while self._waiting and (total is None or self.in_flight < total):
            chosen = self._fairest()
            if chosen is None:
                return
            self._waiting.remove(chosen)
            pool = self.pool(chosen.model)
            pool.in_flight += 1
            pool.by_owner[chosen.flow.owner] += 1
            self._by_owner[chosen.flow.owner] += 1
            chosen.flow.in_flight += 1
            self.in_flight += 1
            chosen.future.set_result(Slot(self, chosen.flow, chosen.model))

    def _fairest(self) -> Waiter | None:
        """The waiter to serve next: fewest in flight for its owner on its model, then on all models (when
        the total cap binds, one owner's batches on two models must not take twice the share), then for
        its batch, then the oldest."""
        best: Waiter | None = None
        best_key: tuple[int, int, int, int] | None = None
        for waiter in self._waiting:
            pool = self.pool(waiter.model)
            if waiter.future.done() or not pool.free or waiter.flow.in_flight >= waiter.flow.cap:
                continue
            owner = waiter.flow.owner
            key = (pool.by_owner[owner], self._by_owner[owner], waiter.flow.in_flight, waiter.order)
            if best_key is None or key < best_key:
                best, best_key = waiter, key
        return best

    def _give_back(self, flow: Flow, model: str) -> None:
        pool = self.pool(model)
        pool.in_flight -= 1
        for by_owner in (pool.by_owner, self._by_owner):
            by_owner[flow.owner] -= 1
            if by_owner[flow.owner] == 0:
                del by_owner[flow.owner]  # owners come and go: keep only those with requests in flight
        flow.in_flight -= 1
        self.in_flight -= 1
        self._forget_if_idle(flow)
        self.grant()

    def _forget_if_idle(self, flow: Flow) -> None:
        """Drop a flow no shard run uses and no request holds (the batch ended here, or paused)."""
        if flow.runs == 0 and flow.in_flight == 0:
            self._flows.pop(flow.batch_id, None)

    # --- what the governor and tests read -------------------------------------------------------

    def waiting(self) -> int:
        return len(self._waiting)

    def in_flight_of(self, batch_id: str) -> int:
        flow = self._flows.get(batch_id)
        return flow.in_flight if flow else 0
