"""Staying up when the model backend does not: which failures to retry, how long to wait, how much
traffic to send.

    is_transient       connection errors, timeouts, HTTP 408/429/500/502/503/504, and other errors
                       raised inside the stack itself; never another 4xx, nor a request the stack
                       refused as invalid (an outage of the stack's stores is no request's failure
                       at all: domain/outages.py, checked first)
    RetryPolicy        exponential backoff with full jitter, or the backend's Retry-After when it sends one
    AdaptiveLimit      a model's capacity in use (scheduler.py): halves when most recent requests failed
                       transiently, grows back by one per limit's worth of successes (additive increase,
                       multiplicative decrease)
    RateLimiter        an optional requests-per-second pace per model

Note that the stack's OpenAI-compatible providers retry a request twice themselves (the openai
client's default) before a failure reaches this provider: one attempt here may be up to three
requests at the backend, and a permanent failure (400) is exactly one.
"""

import asyncio
import email.utils
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
from pydantic import ValidationError

from ..domain.errors import status_code_of

TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_SECONDS = 600.0


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same request again may succeed."""
    if isinstance(exc, openai.APIConnectionError | TimeoutError | ConnectionError):  # timeouts included
        return True
    status = status_code_of(exc)
    if status is not None:
        return status in TRANSIENT_STATUS_CODES
    # No HTTP status: a failure inside the stack, unless the stack refused the request itself.
    return not isinstance(exc, ValidationError | ValueError | TypeError)


def is_backend_failure(exc: BaseException) -> bool:
    """Whether the model backend (or the way to it) failed, rather than code inside the stack: only
    those say anything about the backend's capacity."""
    if isinstance(exc, openai.APIError | TimeoutError | ConnectionError):
        return True
    return status_code_of(exc) is not None


def retry_after_seconds(exc: BaseException) -> float | None:
    """The wait a backend asked for with Retry-After (seconds or an HTTP date), if it did."""
    response: Any = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        seconds = parsed.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a request gets, and the pauses between them."""

    attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, retry: int, retry_after: float | None = None, draw: Callable[[], float] = random.random) -> float:
        """The pause before retry number `retry` (0-based): the backend's wish if it said, else a
        random share of an exponentially growing ceiling (full jitter keeps retries from bunching)."""
        if retry_after is not None:
            return retry_after
        return draw() * min(self.max_backoff, self.initial_backoff * 2**retry)


class AdaptiveLimit:
    """A limit on requests in flight that shrinks while they fail transiently and grows back as they succeed.

    Only the number: the scheduler (scheduler.py) admits requests against it. Halvings in a row
    (a long outage) leave it far below what the backend took before; it grows back by one per
    success up to half that level (doubling per round of requests), then by one per limit's worth.
    """

    def __init__(
        self,
        maximum: int,
        recent: int = 20,
        cooldown_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self._recent: deque[bool] = deque(maxlen=recent)  # True for a transient failure
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._last_decrease = -cooldown_seconds
        self._fast_until = 0.0  # below this, recovering from halvings in a row: +1 per success

    def record_success(self) -> None:
        self._recent.append(False)
        step = 1.0 if self.limit < self._fast_until else 1 / self.limit
        self.limit = min(self.maximum, self.limit + step)
        if self.limit >= self._fast_until:
            self._fast_until = 0.0  # recovered

    def record_transient_failure(self) -> None:
        self._recent.append(True)
        now = self._clock()
        mostly_failing = sum(self._recent) * 2 > len(self._recent)
        if mostly_failing and now - self._last_decrease >= self._cooldown:
            self._fast_until = max(self._fast_until, self.limit / 2)
            self.limit = max(1.0, self.limit / 2)
            self._last_decrease = now


class RateLimiter:
    """Paces requests to at most `per_second` per key (a model), evenly spaced."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / per_second
        self._next: dict[str, float] = {}
        self._clock = clock

    async def wait(self, key: str) -> None:
        now = self._clock()
        start = max(now, self._next.get(key, now))
        self._next[key] = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)
