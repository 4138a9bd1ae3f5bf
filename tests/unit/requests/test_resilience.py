import asyncio

import httpx
import openai
import pytest
from pydantic import BaseModel, ValidationError

from llama_stack_provider_batches.requests.resilience import (
    AdaptiveLimit,
    RateLimiter,
    RetryPolicy,
    is_transient,
    retry_after_seconds,
)


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://model"), headers=headers or {})
    return openai.APIStatusError("backend", response=response, body=None)


def validation_error() -> ValidationError:
    class Strict(BaseModel):
        n: int

    try:
        Strict(n="x")  # type: ignore[arg-type]
    except ValidationError as exc:
        return exc
    raise AssertionError


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses(status: int) -> None:
    assert is_transient(status_error(status))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_permanent_statuses(status: int) -> None:
    assert not is_transient(status_error(status))


def test_errors_without_a_status() -> None:
    request = httpx.Request("POST", "http://model")
    assert is_transient(openai.APIConnectionError(request=request))
    assert is_transient(openai.APITimeoutError(request=request))
    assert is_transient(TimeoutError())
    assert is_transient(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not is_transient(ValueError("'tool_choice' is only allowed when 'tools' is also provided"))
    assert not is_transient(validation_error())


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_seconds(status_error(429, {"Retry-After": "2"})) == 2.0
    assert retry_after_seconds(status_error(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after_seconds(status_error(429)) is None
    assert retry_after_seconds(RuntimeError()) is None
    assert retry_after_seconds(status_error(429, {"Retry-After": "99999"})) == 600.0


def test_backoff_grows_exponentially_with_full_jitter_and_a_ceiling() -> None:
    policy = RetryPolicy(attempts=5, initial_backoff=0.5, max_backoff=3.0)
    assert [policy.delay(retry, draw=lambda: 1.0) for retry in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(2, draw=lambda: 0.25) == 0.5
    assert policy.delay(0, retry_after=7.0) == 7.0


async def test_adaptive_limit_halves_when_mostly_failing_and_grows_back() -> None:
    now = [0.0]
    limit = AdaptiveLimit(8, recent=4, cooldown_seconds=1.0, clock=lambda: now[0])
    limit.record_transient_failure()
    assert limit.limit == 4  # one failure in one: mostly failing
    limit.record_transient_failure()
    assert limit.limit == 4  # within the cooldown: no second halving for the same burst
    now[0] = 2.0
    limit.record_success()
    limit.record_success()
    limit.record_transient_failure()  # the 4 recent outcomes are F, S, S, F: not mostly failing
    assert limit.limit == pytest.approx(4 + 1 / 4 + 1 / 4.25)
    for _ in range(200):
        limit.record_success()
    assert limit.limit == 8


def test_adaptive_limit_recovers_fast_from_halvings_in_a_row() -> None:
    now = [0.0]
    limit = AdaptiveLimit(64, recent=4, cooldown_seconds=1.0, clock=lambda: now[0])
    for _ in range(6):  # a long outage: 64 -> 1
        now[0] += 1
        limit.record_transient_failure()
    assert limit.limit == 1
    successes = 0
    while limit.limit < 32:
        limit.record_success()
        successes += 1
    assert successes == 31  # one per success up to half the level before the outage
    limit.record_success()
    assert limit.limit == pytest.approx(32 + 1 / 32)  # then one per limit's worth


async def test_rate_limiter_spaces_requests_per_key() -> None:
    limiter = RateLimiter(per_second=20)
    started = asyncio.get_running_loop().time()
    for _ in range(5):
        await limiter.wait("model-a")
    await limiter.wait("model-b")  # another model is not held back
    elapsed = asyncio.get_running_loop().time() - started
    assert 0.18 <= elapsed < 0.5
