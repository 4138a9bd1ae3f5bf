"""Enqueued tokens counted from shard rows (SQLite and PostgreSQL): a batch past its owner's limit writes
nothing, tokens come back as shards report results, and concurrent admissions on two stores never
pass the limit together."""

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.ownership import scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.domain.results import Tally
from llama_stack_provider_batches.storage.shards import ShardTokens
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from llama_stack_provider_batches.storage.token_quota import OverTokenLimit, first_over
from tests.unit.helpers import make_batch

SCOPE = scope_of(None)
LIMIT = 1000


def limit_of(model: str) -> int | None:
    return LIMIT if model == "m" else None


async def admit(store: SQLBatchStore, batch_id: str, per_shard: list[dict[str, int]]) -> OverTokenLimit | None:
    """Create a validating batch and write its shards of 10 requests each under the quota."""
    batch = make_batch(batch_id)
    await store.create(StoredBatch(batch=batch))
    ranges = [(10 * n, 10 * n + 10) for n in range(len(per_shard))]
    return await store.shards.create(batch, ranges, 1, True, ShardTokens(SCOPE, per_shard, limit_of))


async def test_a_batch_past_the_limit_writes_nothing_and_says_which_model(replicas) -> None:
    store, _ = replicas
    assert await admit(store, "batch_a", [{"m": 300, "other": 5000}, {"m": 300}]) is None
    assert await store.shards.tokens.enqueued(SCOPE) == {"m": 600, "other": 5000}  # `other` has no limit
    over = await admit(store, "batch_b", [{"m": 500}])
    assert over == OverTokenLimit(model="m", limit=LIMIT, enqueued=600, tokens=500)
    assert "1,000" in over.message() and "'m'" in over.message()
    assert not await store.shards.exist("batch_b")
    assert await store.shards.tokens.enqueued(SCOPE) == {"m": 600, "other": 5000}


async def test_tokens_come_back_as_results_are_stored_and_all_at_once_when_the_batch_moves_on(replicas) -> None:
    store, _ = replicas
    assert await admit(store, "batch_a", [{"m": 300}, {"m": 300}]) is None
    await store.update("batch_a", lambda b: transition(b, "in_progress", now=2))
    lease = await store.shards.claim("server-a", 30, "batch_a")
    assert lease is not None
    await store.shards.save_progress(lease, Tally(completed=4, failed=1))  # half of its ten requests
    assert await store.shards.tokens.enqueued(SCOPE) == {"m": 450}
    assert await admit(store, "batch_b", [{"m": 500}]) is None  # 950: within the limit now
    await store.update("batch_a", lambda b: transition(b, "finalizing", now=3))
    assert await store.shards.tokens.enqueued(SCOPE) == {"m": 500}
    assert await store.shards.tokens.enqueued() == {"m": 500}
    await store.shards.delete("batch_b")
    assert await store.shards.tokens.enqueued() == {}


async def test_admissions_racing_on_two_stores_never_pass_the_limit_together(replicas) -> None:
    outcomes = await asyncio.gather(*(admit(replicas[n % 2], f"batch_{n}", [{"m": 100}]) for n in range(24)))
    assert sum(1 for over in outcomes if over is None) == LIMIT // 100
    assert await replicas[0].shards.tokens.enqueued(SCOPE) == {"m": LIMIT}


@given(
    enqueued=st.dictionaries(st.sampled_from("mno"), st.integers(0, 2000)),
    tokens=st.dictionaries(st.sampled_from("mno"), st.integers(0, 2000), min_size=1),
)
def test_a_batch_is_refused_exactly_when_a_limited_model_would_pass_its_limit(
    enqueued: dict[str, int], tokens: dict[str, int]
) -> None:
    with_batch = {model: enqueued.get(model, 0) + own for model, own in tokens.items()}
    over = first_over(with_batch, tokens, limit_of)
    passes = "m" in tokens and with_batch["m"] > LIMIT
    assert (over is not None) == passes
    if over is not None:
        assert (over.model, over.enqueued, over.tokens) == ("m", enqueued.get("m", 0), tokens["m"])


def test_a_batch_that_alone_passes_the_limit_is_told_to_split_not_to_wait() -> None:
    alone = OverTokenLimit(model="m", limit=1000, enqueued=0, tokens=1500).message()
    assert "alone holds an estimated 1,500" in alone and "split it" in alone and "try again" not in alone
    behind = OverTokenLimit(model="m", limit=1000, enqueued=600, tokens=500).message()
    assert "try again once some of your in-progress batches have completed" in behind
