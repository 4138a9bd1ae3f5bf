"""The loop governor: batch requests in flight cut while the event loop lags, grown back while it does not."""

import asyncio
import time

from llama_stack_provider_batches.engine.governor import (
    COOLDOWN_SECONDS,
    MAX_PAUSE_SECONDS,
    SCAN_SECONDS,
    START_IN_FLIGHT,
    LoopGovernor,
    NewRequests,
    serving_tasks,
)


class Use:
    """What the scheduler reports to the governor: requests in flight, requests waiting, raises heard."""

    def __init__(self, in_flight: int = 0, waiting: int = 0) -> None:
        self.in_flight, self.waiting, self.raises, self.new_requests = in_flight, waiting, 0, False


def governor(use: Use, now: list[float], target: float = 0.01) -> LoopGovernor:
    def heard_raise() -> None:
        use.raises += 1

    return LoopGovernor(
        target, lambda: use.in_flight, lambda: use.waiting, heard_raise, lambda: now[0], lambda: use.new_requests
    )


def test_the_cap_grows_by_one_per_quiet_sample_only_while_batches_use_all_of_it() -> None:
    use, now = Use(in_flight=START_IN_FLIGHT, waiting=3), [0.0]
    governed = governor(use, now)
    governed.observe(0.001)
    governed.observe(0.001)
    assert (governed.cap(), use.raises) == (START_IN_FLIGHT + 1, 2)
    use.in_flight = 2  # not using the cap: no reason to raise it
    governed.observe(0.001)
    use.in_flight, use.waiting = governed.cap(), 0  # nobody waits for more
    governed.observe(0.001)
    governed.observe(0.007)  # under the target, but not under half of it
    assert governed.cap() == START_IN_FLIGHT + 1


def test_lag_cuts_the_cap_from_what_is_in_flight_at_most_once_per_cooldown_never_to_zero() -> None:
    use, now = Use(in_flight=3, waiting=1), [10.0]
    governed = governor(use, now)
    governed.limit = 40.0  # a cap far above use
    governed.observe(0.05)
    assert governed.cap() == 2  # 3 in flight x 0.75
    governed.observe(0.05)
    assert governed.cap() == 2  # within the cooldown
    for _ in range(10):
        now[0] += COOLDOWN_SECONDS
        governed.observe(0.05)
    assert governed.cap() == 1


def test_one_late_sample_cuts_nothing_but_a_loop_that_stays_late_does() -> None:
    use, now = Use(in_flight=10, waiting=5), [10.0]
    governed = governor(use, now)
    governed.limit = 10.0
    governed.observe(0.02)  # twice the target once: one batch response's work, caught by one sample
    assert governed.cap() == 10
    for _ in range(10):
        governed.observe(0.0)
    for _ in range(4):  # the loop stays late
        now[0] += COOLDOWN_SECONDS
        governed.observe(0.02)
    assert governed.cap() < 10


def test_no_batch_request_starts_just_after_an_http_request_did() -> None:
    use, now = Use(in_flight=8, waiting=3), [0.0]
    governed = governor(use, now)
    governed.limit = 8.0
    use.new_requests = True
    assert governed.cap() == 0  # seen at the grant itself, before any sample
    governed.observe(0.05)  # the new request's own work makes the loop lag: not held against batches
    assert governed.limit == 8.0
    use.new_requests, use.in_flight = False, 1
    governed.observe(0.001)
    assert (governed.cap(), use.raises) == (8, 1)  # the cap it had, and the scheduler heard it may grant


class FakeTask:
    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished


def test_a_request_pauses_batches_from_its_start_for_a_bounded_time_or_until_answered() -> None:
    now, tasks = [0.0], []
    new_requests = NewRequests(lambda: tasks, clock=lambda: now[0])
    assert not new_requests()
    stream, short = FakeTask(), FakeTask()
    tasks.append(stream)
    now[0] += SCAN_SECONDS
    assert new_requests()
    now[0] += MAX_PAUSE_SECONDS
    assert not new_requests()  # a long request (a stream) pauses batches for a while only
    tasks.append(short)
    now[0] += SCAN_SECONDS
    assert new_requests()  # a new one pauses them again
    short.finished = True
    tasks.remove(short)
    now[0] += SCAN_SECONDS
    assert not new_requests()  # answered: the pause ends with it


async def test_uvicorn_request_tasks_are_the_servers_requests() -> None:
    async def run_asgi() -> None:  # the name of uvicorn's coroutine serving one request
        await asyncio.sleep(1)

    assert serving_tasks() == []
    serving = asyncio.create_task(run_asgi())
    await asyncio.sleep(0)
    assert serving_tasks() == [serving]
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


async def test_it_measures_the_loops_lag() -> None:
    use = Use(in_flight=1, waiting=1)
    governed = LoopGovernor(0.01, lambda: use.in_flight, lambda: use.waiting, lambda: None, new_requests=lambda: False)
    task = asyncio.create_task(governed.run())
    await asyncio.sleep(0.05)
    time.sleep(0.1)  # the loop is blocked: the sample that ends next is about 0.1 s late
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert governed.cap() < START_IN_FLIGHT
