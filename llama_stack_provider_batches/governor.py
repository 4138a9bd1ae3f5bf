"""Interactive traffic first: a cap on batch requests in flight that tightens while the server serves
HTTP requests or its event loop lags.

The stack serves every request of a process on one asyncio event loop, and batch work runs on the
same loop: each batch response costs it some milliseconds (the stack's routing, the HTTP client,
the result log). With many in flight, their steps queue ahead of an interactive request's, whose
latency then grows with the queue (a window of 32 on a fast backend pushed health checks' p99 from
about 10 ms to 200 ms). The governor measures the loop's lag, how late a short sleep wakes up, which
is how late any request's next step runs, and counts the HTTP requests the server is serving, every
SAMPLE_SECONDS, and adjusts the scheduler's cap:

    HTTP requests being served      no new batch request until they are answered, for at most
                                    MAX_PAUSE_SECONDS in a row (then MIN_IN_FLIGHT): each step of
                                    theirs waits behind the batch work on the loop, so an idle loop
                                    is what keeps a chat completion near its idle latency
    lag above the target            the cap shrinks by a quarter (at most once per COOLDOWN_SECONDS)
    lag under half the target,      the cap grows by half a request per sample
    while batches use all of it

HTTP requests are looked for at every grant, so a batch request that would start beside one does
not; they are recognised as uvicorn serves them, each in a task running its `run_asgi` coroutine (a
server naming them otherwise leaves the lag as the only signal). Apart from those pauses the cap
never goes under MIN_IN_FLIGHT: batches always progress, taking what interactive traffic leaves.
"""

import asyncio
import time
from collections.abc import Callable

SAMPLE_SECONDS = 0.01
COOLDOWN_SECONDS = 0.1
MIN_IN_FLIGHT = 1
START_IN_FLIGHT = 4
DECREASE_FACTOR = 0.75
INCREASE_PER_SAMPLE = 0.5
MAX_PAUSE_SECONDS = 0.25  # a long request (a stream) must not stop batches for its whole length


def http_requests_in_progress() -> int:
    """The HTTP requests this process's server is serving now: uvicorn runs each in a task of its own."""
    return sum(1 for task in asyncio.all_tasks() if getattr(task.get_coro(), "__name__", "") == "run_asgi")


class LoopGovernor:
    """Keeps the event loop's lag near `target_seconds` by capping batch requests in flight."""

    def __init__(
        self,
        target_seconds: float,
        in_flight: Callable[[], int],
        waiting: Callable[[], int],
        on_raise: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        serving: Callable[[], int] = http_requests_in_progress,
    ) -> None:
        """`in_flight` and `waiting` read the scheduler; `on_raise` lets it grant what the new cap allows;
        `serving` counts the interactive requests under way."""
        self.target_seconds = target_seconds
        self.limit = float(START_IN_FLIGHT)
        self.interactive = False  # HTTP requests were being served at the last look
        self._interactive_since: float | None = None
        self._serving = serving
        self._in_flight = in_flight
        self._waiting = waiting
        self._on_raise = on_raise
        self._clock = clock
        self._last_decrease = -COOLDOWN_SECONDS
        self.last_lag = 0.0

    def cap(self) -> int:
        """Batch requests that may be in flight now (the scheduler asks at every grant)."""
        self._note_interactive(self._serving() > 0)
        if self._interactive_since is not None:
            return 0 if self._clock() - self._interactive_since < MAX_PAUSE_SECONDS else MIN_IN_FLIGHT
        return int(self.limit)

    def _note_interactive(self, interactive: bool) -> bool:
        """Record whether HTTP requests are being served; True if they have just all been answered."""
        answered = self.interactive and not interactive
        self.interactive = interactive
        if not interactive:
            self._interactive_since = None
        elif self._interactive_since is None:
            self._interactive_since = self._clock()
        return answered

    def observe(self, lag: float, interactive: bool = False) -> None:
        """Adjust the cap to one sample: the loop's lag, and whether HTTP requests are being served."""
        self.last_lag = lag
        if self._note_interactive(interactive) or interactive:
            # Answered: back to the cap it had. Still serving: a pause may have run its length.
            # Either way the scheduler may grant again. Their own work made the lag: not held against batches.
            self._on_raise()
            return
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
            self.observe(max(0.0, time.perf_counter() - started - SAMPLE_SECONDS), self._serving() > 0)
