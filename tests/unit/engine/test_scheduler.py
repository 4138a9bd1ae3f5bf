"""The scheduler's shares: between users, between one user's batches, a batch's cap, the model's capacity."""

import asyncio
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_stack_provider_batches.engine.scheduler import Flow, Scheduler, Slot

GRANTED: list[tuple["Demand", Slot]] = []  # every slot a Demand holds, oldest first


class Demand:
    """A batch that always wants more requests in flight than it gets: `wanted` waits pending at a time."""

    def __init__(self, scheduler: Scheduler, flow: Flow, model: str = "m", wanted: int = 50) -> None:
        self.held: list[Slot] = []
        self._want_more = lambda: asyncio.create_task(self._want(scheduler, flow, model))
        self._tasks = [self._want_more() for _ in range(wanted)]
        self._stopped = False

    async def _want(self, scheduler: Scheduler, flow: Flow, model: str) -> None:
        slot = await scheduler.acquire(flow, model)
        self.held.append(slot)
        GRANTED.append((self, slot))

    def finish_one(self) -> None:
        slot = self.held.pop()
        GRANTED.remove((self, slot))
        self.finished(slot)

    def finished(self, slot: Slot) -> None:
        """A request of this batch ends: its slot is free, and (until stopped) the batch wants one more."""
        if not self._stopped:
            self._tasks.append(self._want_more())
        slot.release()

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self.held:
            self.finish_one()


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def turn_over(rounds: int) -> None:
    """Finish the oldest request, `rounds` times, as requests of equal latency would."""
    for _ in range(rounds):
        if GRANTED:
            demand, slot = GRANTED.pop(0)
            demand.held.remove(slot)
            demand.finished(slot)
            await settle()


async def test_one_batch_alone_gets_all_its_cap_allows() -> None:
    roomy, tight = Scheduler(capacity_per_model=64, batch_cap=10), Scheduler(capacity_per_model=4, batch_cap=10)
    with roomy.flow("b1", "alice") as a, tight.flow("b1", "alice") as b:
        demands = [Demand(roomy, a), Demand(tight, b)]
        await settle()
        assert (roomy.in_flight_of("b1"), tight.in_flight_of("b1")) == (10, 4)
        for demand in demands:
            await demand.stop()


async def test_capacity_is_shared_between_users_first_then_between_a_users_batches() -> None:
    scheduler = Scheduler(capacity_per_model=12, batch_cap=10)
    with (
        scheduler.flow("a1", "alice") as a1,
        scheduler.flow("a2", "alice") as a2,
        scheduler.flow("a3", "alice") as a3,
        scheduler.flow("b1", "bob") as b1,
    ):
        # Alice's three batches ask first: the first takes its cap, the second the rest.
        alice = [Demand(scheduler, flow) for flow in (a1, a2, a3)]
        await settle()
        assert [scheduler.in_flight_of(b) for b in ("a1", "a2", "a3")] == [10, 2, 0]
        await turn_over(24)  # as requests finish, their slots go to the batch holding fewest
        assert [scheduler.in_flight_of(b) for b in ("a1", "a2", "a3")] == [4, 4, 4]
        bob = Demand(scheduler, b1)
        await settle()
        assert scheduler.in_flight_of("b1") == 0  # no slot is taken back: bob gets the next ones free
        await turn_over(6)
        assert scheduler.in_flight_of("b1") == 6  # every slot freed meanwhile went to bob
        await turn_over(24)
        assert scheduler.in_flight_of("b1") == 6
        assert [scheduler.in_flight_of(b) for b in ("a1", "a2", "a3")] == [2, 2, 2]
        # Bob's batch ends: its share goes back to alice's batches at once.
        await bob.stop()
        await settle()
        assert [scheduler.in_flight_of(b) for b in ("a1", "a2", "a3")] == [4, 4, 4]
        for demand in alice:
            await demand.stop()
    assert scheduler.in_flight == 0


async def test_a_small_batch_behind_a_big_one_starts_at_the_next_free_slot() -> None:
    scheduler = Scheduler(capacity_per_model=10, batch_cap=10)
    with scheduler.flow("big", "alice") as big_flow, scheduler.flow("small", "bob") as small_flow:
        big = Demand(scheduler, big_flow)
        await settle()
        assert scheduler.in_flight_of("big") == 10
        small = asyncio.create_task(scheduler.acquire(small_flow, "m"))
        await settle()
        big.finish_one()
        slot = await asyncio.wait_for(small, 1)  # ahead of the big batch's many waiting requests
        assert scheduler.in_flight_of("small") == 1
        slot.release()
        await big.stop()


async def test_each_model_has_its_own_capacity_and_all_share_the_total() -> None:
    scheduler = Scheduler(capacity_per_model=3, capacity_by_model={"big": 5}, total_capacity=7, batch_cap=100)
    with scheduler.flow("b", "alice") as flow:
        small, big = Demand(scheduler, flow, "small"), Demand(scheduler, flow, "big")
        await settle()
        assert (len(small.held), len(big.held)) == (3, 4)  # 3 + 5 would exceed the total of 7
        assert scheduler.in_flight == 7
        await small.stop()
        await settle()
        assert len(big.held) == 5
        await big.stop()


async def held_and_waited_for(scheduler: Scheduler, flow: Flow) -> tuple[Slot, asyncio.Task[Slot]]:
    """Take the only slot of model "m", and start a second request that waits for it."""
    held = await scheduler.acquire(flow, "m")
    waiting = asyncio.create_task(scheduler.acquire(flow, "m"))
    await settle()
    return held, waiting


async def test_a_cancelled_wait_takes_no_slot() -> None:
    scheduler = Scheduler(capacity_per_model=1)
    with scheduler.flow("b", "alice") as flow:
        held, waiting = await held_and_waited_for(scheduler, flow)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert scheduler.waiting() == 0
        held.release()
        held.release()  # a second release changes nothing
        assert scheduler.in_flight == 0
        again = await asyncio.wait_for(scheduler.acquire(flow, "m"), 1)
        again.release()


async def test_a_wait_cancelled_just_as_it_is_granted_gives_the_slot_back() -> None:
    scheduler = Scheduler(capacity_per_model=1)
    with scheduler.flow("b", "alice") as flow:
        held, waiting = await held_and_waited_for(scheduler, flow)
        held.release()  # grants the waiter: its future has a result, its task has not run yet
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert scheduler.in_flight == 0


async def test_transient_failures_shrink_the_models_capacity_for_everyone() -> None:
    scheduler = Scheduler(capacity_per_model=8, batch_cap=8)
    with scheduler.flow("a", "alice") as a:
        slot = await scheduler.acquire(a, "m")
        slot.record_transient_failure()
        slot.release()
        assert scheduler.pool("m").limit.limit == 4
        demand = Demand(scheduler, a)
        await settle()
        assert len(demand.held) == 4
        await demand.stop()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 4)), min_size=1, max_size=6),
    st.integers(1, 12),
    st.integers(1, 6),
    st.lists(st.integers(0, 20), max_size=40),
)
def test_shares_stay_within_every_limit_and_fair_at_saturation(
    batches: list[tuple[str, int]], capacity: int, cap: int, finishing: list[int]
) -> None:
    """Whatever the batches and the order in which requests finish: no limit is exceeded, no slot
    stays free while someone could use it, and owners that want more hold within one of each other
    (or all their batches are at their cap)."""

    async def scenario() -> None:
        GRANTED.clear()
        scheduler = Scheduler(capacity_per_model=capacity, batch_cap=cap)
        flows = [(owner, Flow(f"b{n}", owner, cap)) for n, (owner, _) in enumerate(batches)]
        demands = [Demand(scheduler, flow, wanted=20) for _, flow in flows]
        await settle()
        for pick in [*finishing, -1]:
            holding = [demand for demand in demands if demand.held]
            if pick >= 0 and holding:
                holding[pick % len(holding)].finish_one()
                await settle()
            in_flight = [flow.in_flight for _, flow in flows]
            assert scheduler.in_flight == sum(in_flight) <= capacity
            assert all(n <= cap for n in in_flight)
            assert scheduler.in_flight == capacity or all(n == cap for n in in_flight)  # work-conserving
        # Once every request in flight has been replaced by a new one, shares are fair: an owner still
        # wanting more holds no less than anyone else minus one, and so does a batch within its owner's.
        await turn_over(3 * capacity)
        by_owner = Counter()
        for owner, flow in flows:
            by_owner[owner] += flow.in_flight
        for owner, flow in flows:
            if flow.in_flight < cap:
                assert by_owner[owner] >= max(by_owner.values()) - 1
                assert all(flow.in_flight >= other.in_flight - 1 for o, other in flows if o == owner)
        for demand in demands:
            await demand.stop()
        assert scheduler.in_flight == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("owners", [1, 3])
async def test_requests_finish_and_free_everything(owners: int) -> None:
    scheduler = Scheduler(capacity_per_model=5, batch_cap=3)
    done = Counter()

    async def batch(name: str, owner: str, requests: int) -> None:
        with scheduler.flow(name, owner) as flow:

            async def one() -> None:
                slot = await scheduler.acquire(flow, "m")
                await asyncio.sleep(0.001)
                done[name] += 1
                slot.release()

            await asyncio.gather(*(one() for _ in range(requests)))

    await asyncio.gather(*(batch(f"b{n}", f"u{n % owners}", 20) for n in range(4)))
    assert done == {f"b{n}": 20 for n in range(4)}
    assert scheduler.in_flight == 0 and scheduler.waiting() == 0


async def test_nothing_is_granted_while_the_governor_allows_nothing() -> None:
    allowed = [0]
    scheduler = Scheduler(capacity_per_model=8, loop_limit=lambda: allowed[0])
    with scheduler.flow("b", "alice") as flow:
        waiting = asyncio.create_task(scheduler.acquire(flow, "m"))
        await settle()
        assert not waiting.done()  # interactive requests are being served
        allowed[0] = 2
        scheduler.grant()  # what the governor does once they are answered
        slot = await asyncio.wait_for(waiting, 1)
        slot.release()
