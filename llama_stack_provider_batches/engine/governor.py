"""Interactive traffic first: a cap on batch requests in flight that tightens while the server serves
HTTP requests or its event loop lags.

The stack serves every request of a process on one asyncio event loop, and batch work runs on the
same loop: each batch response costs it some milliseconds (the stack's routing, the HTTP client,
the result log). With many in flight, their steps queue ahead of an interactive request's, whose
latency then grows with the queue (a window of 32 on a fast backend pushed health checks' p99 from
about 10 ms to 200 ms). The governor measures the loop's lag, how late a short sleep wakes up, which
is how late any request's next step runs, and counts the HTTP requests the server is serving, every
SAMPLE_SECONDS, and adjusts the scheduler's cap:

    an HTTP request started         no new batch request for MAX_PAUSE_SECONDS after it started, or
    under MAX_PAUSE_SECONDS ago     until it is answered if that comes first: each step of it waits
                                    behind the batch work on the loop, so a quiet loop is what keeps
                                    a chat completion near its idle latency; a longer request (a
                                    stream) pauses nothing after that
    lag above the target            the cap shrinks by a quarter (at most once per COOLDOWN_SECONDS)
    lag under half the target,      the cap grows by half a request per sample
    while batches use all of it

where the lag is its moving average over the last few samples (LAG_WEIGHT): a single late sample,
as when it met one batch response's work, is no reason to cut (at 200 ms per request, cutting on
single samples kept a window of 10 at about 8 in flight: 3 % of the batch's time).

HTTP requests are looked for at grants too (at most every SCAN_SECONDS), so a batch request that
would start beside a new one does not; they are recognised as uvicorn serves them, each in a task
running its `run_asgi` coroutine (a server naming them otherwise leaves the lag as the only signal).
Apart from those pauses the cap never goes under MIN_IN_FLIGHT: batches always progress, taking
what interactive traffic leaves.
"""

import asyncio
import time
import weakref
from collections.abc import Callable, Iterable

from ..stack import get_logger
from .scheduler import Scheduler

logger = get_logger(name=__name__, category="providers")

SAMPLE_SECONDS = 0.01
# The lag the cap follows is a moving average (this weight on each new sample: about the last 40 ms),
# so that one batch response's few milliseconds of work, caught by one sample, cut nothing; a loop
# that stays late, or one long stall, does.
LAG_WEIGHT = 0.25
COOLDOWN_SECONDS = 0.1
MIN_IN_FLIGHT = 1
START_IN_FLIGHT = 4
DECREASE_FACTOR = 0.75
INCREASE_PER_SAMPLE = 0.5
MAX_PAUSE_SECONDS = 0.25  # a long request (a stream) must not stop batches for its whole length
SCAN_SECONDS = 0.002  # how stale the look at the server's requests may be: a look walks every task
FAILURE_LOG_SECONDS = 60.0  # a sample failing every 10 ms is logged once a minute, not 100 times a second


def serving_tasks() -> list[asyncio.Task[object]]:
    """The HTTP requests this process's server is serving now: uvicorn runs each in a task of its own."""
    return [task for task in asyncio.all_tasks() if getattr(task.get_coro(), "__name__", "") == "run_asgi"]


class NewRequests:
    """Whether the server started answering an HTTP request less than MAX_PAUSE_SECONDS ago."""

    def __init__(
        self,
        tasks: Callable[[], Iterable[asyncio.Task[object]]] = serving_tasks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tasks = tasks
        self._clock = clock
        self._first_seen: weakref.WeakKeyDictionary[asyncio.Task[object], float] = weakref.WeakKeyDictionary()
        self._looked_at = -SCAN_SECONDS
        self._any = False

    def __call__(self) -> bool:
        now = self._clock()
        if now - self._looked_at >= SCAN_SECONDS:
            self._looked_at = now
            for task in self._tasks():
                self._first_seen.setdefault(task, now)
            self._any = any(
                now - seen < MAX_PAUSE_SECONDS for task, seen in self._first_seen.items() if not task.done()
            )
        return self._any


def govern(scheduler: Scheduler, target_ms: float) -> "LoopGovernor":
    """A governor for `scheduler`, set as its cap; its `run()` must then be started on the serving loop."""
    governor = LoopGovernor(target_ms / 1000, lambda: scheduler.in_flight, scheduler.waiting, scheduler.grant)
    scheduler.loop_limit = governor.cap
    return governor


class LoopGovernor:
    """Keeps the event loop's lag near `target_seconds` by capping batch requests in flight."""

    def __init__(
        self,
        target_seconds: float,
        in_flight: Callable[[], int],
        waiting: Callable[[], int],
        on_raise: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        new_requests: Callable[[], bool] | None = None,
    ) -> None:
        """`in_flight` and `waiting` read the scheduler; `on_raise` lets it grant what the new cap allows;
        `new_requests` tells whether HTTP requests have just started (NewRequests)."""
        self.target_seconds = target_seconds
        self.limit = float(START_IN_FLIGHT)
        self.interactive = False  # batches paused for new HTTP requests at the last look
        self._new_requests = new_requests or NewRequests(clock=clock)
        self._in_flight = in_flight
        self._waiting = waiting
        self._on_raise = on_raise
        self._clock = clock
        self._last_decrease = -COOLDOWN_SECONDS
        self._failure_logged_at = -FAILURE_LOG_SECONDS
        self.last_lag = 0.0
        self.smoothed_lag = 0.0

    def cap(self) -> int:
        """Batch requests that may be in flight now (the scheduler asks at every grant)."""
        self.interactive = self._new_requests()
        return 0 if self.interactive else int(self.limit)

    def observe(self, lag: float) -> None:
        """Adjust the cap to one more sample of the loop's lag."""
        self.last_lag = lag
        paused, self.interactive = self.interactive, self._new_requests()
        if paused and not self.interactive:
            self._on_raise()  # the pause is over: back to the cap it had
        if paused or self.interactive:
            return  # the new requests' own work made the lag: not held against batches
        self.smoothed_lag += LAG_WEIGHT * (lag - self.smoothed_lag)
        lag = self.smoothed_lag
        now = self._clock()
        if lag > self.target_seconds:
            if now - self._last_decrease >= COOLDOWN_SECONDS:
                # From what is in flight, not the cap: a cap far above use would take many cuts to bite.
                base = min(self.limit, max(self._in_flight(), MIN_IN_FLIGHT))
                self.limit = max(float(MIN_IN_FLIGHT), base * DECREASE_FACTOR)
                self._last_decrease = now
        elif lag < self.target_seconds / 2 and self._waiting() and self._in_flight() >= int(self.limit):
            self.limit += INCREASE_PER_SAMPLE
            self._on_raise()

    async def run(self) -> None:
        """Sample the loop's lag until cancelled."""
        while True:
            started = time.perf_counter()
            await asyncio.sleep(SAMPLE_SECONDS)
            try:
                self.observe(max(0.0, time.perf_counter() - started - SAMPLE_SECONDS))
            except Exception:  # batches must not wait for a pause nobody ends
                if self._clock() - self._failure_logged_at >= FAILURE_LOG_SECONDS:
                    self._failure_logged_at = self._clock()
                    logger.exception("The loop governor failed a sample; batches go at their last cap")
                self.interactive = False
                self._on_raise()
