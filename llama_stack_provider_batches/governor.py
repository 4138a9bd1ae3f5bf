"""Interactive traffic first: a cap on batch requests in flight that tightens while the serving loop lags.

The stack serves every request of a process on one asyncio event loop, and batch work runs on the
same loop: each batch response costs it some milliseconds (the stack's routing, the HTTP client,
the result log). With many in flight, their steps queue ahead of an interactive request's, whose
latency then grows with the queue (a window of 32 on a fast backend pushed health checks' p99 from
about 10 ms to 200 ms). The governor measures the loop's lag, how late a short sleep wakes up, which
is how late any request's next step runs, every SAMPLE_SECONDS, and adjusts the scheduler's cap:

    lag above the target            the cap shrinks by a quarter (at most once per COOLDOWN_SECONDS)
    lag under half the target,      the cap grows by one
    while batches use all of it

The cap never goes under MIN_IN_FLIGHT, so batches always progress: they take what the loop leaves.
"""

import asyncio
import time
from collections.abc import Callable

SAMPLE_SECONDS = 0.02
COOLDOWN_SECONDS = 0.1
MIN_IN_FLIGHT = 1
START_IN_FLIGHT = 4
DECREASE_FACTOR = 0.75


class LoopGovernor:
    """Keeps the event loop's lag near `target_seconds` by capping batch requests in flight."""

    def __init__(
        self,
        target_seconds: float,
        in_flight: Callable[[], int],
        waiting: Callable[[], int],
        on_raise: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`in_flight` and `waiting` read the scheduler; `on_raise` lets it grant what the new cap allows."""
        self.target_seconds = target_seconds
        self.limit = float(START_IN_FLIGHT)
        self._in_flight = in_flight
        self._waiting = waiting
        self._on_raise = on_raise
        self._clock = clock
        self._last_decrease = -COOLDOWN_SECONDS
        self.last_lag = 0.0

    def cap(self) -> int:
        return int(self.limit)

    def observe(self, lag: float) -> None:
        """Adjust the cap to one lag sample."""
        self.last_lag = lag
        now = self._clock()
        if lag > self.target_seconds:
            if now - self._last_decrease >= COOLDOWN_SECONDS:
                # From what is in flight, not the cap: a cap far above use would take many cuts to bite.
                base = min(self.limit, max(self._in_flight(), MIN_IN_FLIGHT))
                self.limit = max(float(MIN_IN_FLIGHT), base * DECREASE_FACTOR)
                self._last_decrease = now
        elif lag < self.target_seconds / 2 and self._waiting() and self._in_flight() >= self.cap():
            self.limit += 1
            self._on_raise()

    async def run(self) -> None:
        """Sample the loop's lag until cancelled."""
        while True:
            started = time.perf_counter()
            await asyncio.sleep(SAMPLE_SECONDS)
            self.observe(max(0.0, time.perf_counter() - started - SAMPLE_SECONDS))
