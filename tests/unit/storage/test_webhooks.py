import asyncio
import json

import pytest
from cryptography.fernet import Fernet
from openai.types.batch_request_counts import BatchRequestCounts
from sqlalchemy import delete, select

from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.ownership import Owner, scope_of
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.storage.secrets import SecretBox, SecretKeyError
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from llama_stack_provider_batches.storage.webhooks import OperatorEndpoint, WebhookStore
from tests.unit.helpers import make_batch

ALICE = Owner(principal="alice", attributes={"teams": ["a"]})
BOB = Owner(principal="bob", attributes={"teams": ["b"]})
EVERY_TYPE = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
LIMIT = 10


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(Fernet.generate_key())


@pytest.fixture
async def hooks(store: SQLBatchStore, box: SecretBox) -> WebhookStore:
    return await webhook_store(store, box)


async def webhook_store(store: SQLBatchStore, box: SecretBox) -> WebhookStore:
    """A webhook store over a store already started: its tables made as the start-up makes them."""
    hooks = store.webhook_store(box)
    await store._db.create_tables()
    return hooks


async def end_batch(store: SQLBatchStore, batch_id: str, owner: Owner | None, status: str = "completed") -> None:
    counts = BatchRequestCounts(total=1, completed=1, failed=0)
    await store.create(StoredBatch(batch=make_batch(batch_id, status="finalizing", request_counts=counts), owner=owner))

    def end(stored: StoredBatch) -> StoredBatch:
        return stored.model_copy(update={"batch": transition(stored.batch, status, 1)})  # type: ignore[arg-type]

    await store.update_record(batch_id, end)


async def events_of(store: SQLBatchStore) -> list[tuple[str, str]]:
    events = store._db.events
    return [(row.batch_id, row.type) for row in await store._db.read(select(events))]


async def test_a_batch_that_ends_writes_its_event_with_the_move_and_no_other_move_does(store: SQLBatchStore) -> None:
    await store.create(StoredBatch(batch=make_batch("batch_v", status="validating")))
    await store.update_record(
        "batch_v", lambda s: s.model_copy(update={"batch": transition(s.batch, "in_progress", 1)})
    )
    assert await events_of(store) == []
    await end_batch(store, "batch_e", ALICE, "expired")
    assert await events_of(store) == [("batch_e", "batch.expired")]


async def test_an_event_fans_out_to_its_owners_endpoints_of_that_type_and_the_operators(
    store: SQLBatchStore, hooks: WebhookStore
) -> None:
    mine = await hooks.create_endpoint(ALICE, "all", "https://a.example/h", EVERY_TYPE, "whsec_c2VjcmV0", 1, LIMIT)
    await hooks.create_endpoint(ALICE, "failures", "https://a.example/f", ["batch.failed"], "whsec_c2VjcmV0", 1, LIMIT)
    await hooks.create_endpoint(BOB, "bob's", "https://b.example/h", EVERY_TYPE, "whsec_c2VjcmV0", 1, LIMIT)
    operator = OperatorEndpoint("op_1", "https://ops.example/h", "whsec_b3A=", frozenset(EVERY_TYPE))
    await end_batch(store, "batch_a", ALICE)
    assert await hooks.fan_out([operator]) == 1
    assert await hooks.fan_out([operator]) == 0  # an event is fanned out once
    claimed = await hooks.claim_due(10, 30)
    assert sorted(d.endpoint_id for d in claimed) == sorted([mine.id, "op_1"])
    assert {(d.batch_id, d.type) for d in claimed} == {("batch_a", "batch.completed")}
    assert await events_of(store) == []


async def test_a_delivery_is_held_by_one_process_until_delivered_or_put_back(
    store: SQLBatchStore, hooks: WebhookStore
) -> None:
    await hooks.create_endpoint(None, "e", "https://a.example/h", EVERY_TYPE, "whsec_c2VjcmV0", 1, LIMIT)
    await end_batch(store, "batch_d", None)
    await hooks.fan_out([])
    [delivery] = await hooks.claim_due(10, 30)
    assert await hooks.claim_due(10, 30) == []  # another process finds it held
    await hooks.retry_later(delivery, 3600, "HTTP 500")
    assert await hooks.claim_due(10, 30) == []  # not due for an hour
    assert await hooks.pending() == 1
    await hooks.retry_later(delivery, 0, "")  # a stale lease token changes nothing
    deliveries = store._db.deliveries
    [row] = await store._db.read(select(deliveries))
    assert (row.attempts, row.last_error) == (1, "HTTP 500")


async def test_deleting_an_endpoint_drops_its_deliveries(store: SQLBatchStore, hooks: WebhookStore) -> None:
    endpoint = await hooks.create_endpoint(None, "e", "https://a.example/h", EVERY_TYPE, "whsec_c2VjcmV0", 1, LIMIT)
    await end_batch(store, "batch_x", None)
    await hooks.fan_out([])
    assert await hooks.delete_endpoint(endpoint.id)
    assert await hooks.pending() == 0 and await hooks.get_endpoint(endpoint.id) is None
    assert not await hooks.delete_endpoint(endpoint.id)


async def test_secrets_are_stored_sealed_and_a_rotated_one_is_honoured_while_kept(
    store: SQLBatchStore, hooks: WebhookStore
) -> None:
    endpoint = await hooks.create_endpoint(
        ALICE, "e", "https://a.example/h", EVERY_TYPE, "whsec_b2xkc2VjcmV0", 1, LIMIT
    )
    [row] = await store._db.read(select(store._db.endpoints))
    assert "b2xkc2VjcmV0" not in json.dumps(dict(row._mapping))  # a dump of the table holds no secret
    assert row.scope == scope_of(ALICE)
    await hooks.rotate_secret(endpoint, "whsec_bmV3c2VjcmV0", 2, keep_old_for=3600)
    rotated = await hooks.get_endpoint(endpoint.id)
    assert rotated is not None
    assert hooks.signing_secrets(rotated, 0) == ["whsec_bmV3c2VjcmV0", "whsec_b2xkc2VjcmV0"]
    assert hooks.signing_secrets(rotated, rotated.previous_until or 0) == ["whsec_bmV3c2VjcmV0"]  # after 24 h
    await hooks.rotate_secret(rotated, "whsec_dGhpcmQ=", 3, keep_old_for=0)
    third = await hooks.get_endpoint(endpoint.id)
    assert third is not None and hooks.signing_secrets(third, 0) == ["whsec_dGhpcmQ="]


async def test_endpoints_are_listed_per_scope_newest_first(hooks: WebhookStore) -> None:
    made = [
        await hooks.create_endpoint(ALICE, f"e{n}", "https://a.example/h", EVERY_TYPE, "whsec_eA==", n, LIMIT)
        for n in range(3)
    ]
    await hooks.create_endpoint(BOB, "b", "https://b.example/h", EVERY_TYPE, "whsec_eA==", 9, LIMIT)
    first = await hooks.page_endpoints(scope_of(ALICE), None, 2)
    assert first is not None and [e.name for e in first[0]] == ["e2", "e1"] and first[1]
    rest = await hooks.page_endpoints(scope_of(ALICE), first[0][-1].id, 2)
    assert rest is not None and [e.name for e in rest[0]] == ["e0"] and not rest[1]
    assert await hooks.page_endpoints(scope_of(BOB), made[0].id, 2) is None
    listed = await hooks.page_endpoints(scope_of(ALICE), None, 100)
    assert listed is not None and len(listed[0]) == 3


async def test_a_delivery_given_back_untried_is_due_again_with_no_attempt_counted(
    store: SQLBatchStore, hooks: WebhookStore
) -> None:
    await hooks.create_endpoint(None, "e", "https://a.example/h", EVERY_TYPE, "whsec_c2VjcmV0", 1, LIMIT)
    await end_batch(store, "batch_g", None)
    await hooks.fan_out([])
    [delivery] = await hooks.claim_due(10, 30)
    await hooks.release(delivery)
    [again] = await hooks.claim_due(10, 30)
    assert (again.event_id, again.attempts) == (delivery.event_id, 0)


async def test_an_update_that_changes_nothing_leaves_updated_at_alone(hooks: WebhookStore) -> None:
    made = await hooks.create_endpoint(ALICE, "e", "https://a.example/h", EVERY_TYPE, "whsec_eA==", 1, LIMIT)
    assert made is not None
    await hooks.update_endpoint(made.id, 5, "e", "https://a.example/h", EVERY_TYPE)
    same = await hooks.get_endpoint(made.id)
    assert same is not None and same.updated_at == 1  # OpenAI: "unchanged updates do not advance it"
    await hooks.update_endpoint(made.id, 6, "e", "https://a.example/h", ["batch.failed"])
    changed = await hooks.get_endpoint(made.id)
    assert changed is not None and (changed.updated_at, changed.event_types) == (6, ["batch.failed"])


async def test_an_endpoint_whose_secret_does_not_open_here_is_still_read_listed_rotated_and_deleted(
    store: SQLBatchStore, hooks: WebhookStore
) -> None:
    made = await hooks.create_endpoint(ALICE, "e", "https://a.example/h", EVERY_TYPE, "whsec_b2xkc2VjcmV0", 1, LIMIT)
    assert made is not None and made.secret_hint == "whsec_...cmV0"
    elsewhere = await webhook_store(store, SecretBox(Fernet.generate_key()))  # a replica with another key
    found = await elsewhere.get_endpoint(made.id)
    assert found is not None and found.secret_hint == "whsec_...cmV0"
    page = await elsewhere.page_endpoints(scope_of(ALICE), None, 10)
    assert page is not None and [e.id for e in page[0]] == [made.id]
    with pytest.raises(SecretKeyError):
        elsewhere.signing_secrets(found, 0)
    # Rotating mends it: the old secret, which this key cannot open, is not kept.
    await elsewhere.rotate_secret(found, "whsec_bmV3", 2, keep_old_for=3600)
    rotated = await elsewhere.get_endpoint(made.id)
    assert rotated is not None and rotated.secret_hint == "whsec_...bmV3"
    assert elsewhere.signing_secrets(rotated, 0) == ["whsec_bmV3"]
    assert await elsewhere.delete_endpoint(made.id) and await hooks.get_endpoint(made.id) is None
    assert await store._db.read(select(elsewhere._hints)) == []


async def test_an_endpoint_stored_before_hints_were_still_shows_its_hint(
    store: SQLBatchStore, hooks: WebhookStore
) -> None:
    made = await hooks.create_endpoint(None, "e", "https://a.example/h", EVERY_TYPE, "whsec_b2xkc2VjcmV0", 1, LIMIT)
    assert made is not None
    await store._db.write(delete(hooks._hints))  # as an earlier release left it: no hint row
    found = await hooks.get_endpoint(made.id)
    assert found is not None and found.secret_hint == "whsec_...cmV0"
    elsewhere = await webhook_store(store, SecretBox(Fernet.generate_key()))
    unopened = await elsewhere.get_endpoint(made.id)
    assert unopened is not None and unopened.secret_hint is None  # OpenAI's field is optional
    assert await elsewhere.delete_endpoint(made.id)


async def test_creates_racing_on_two_replicas_stay_within_the_limit(
    replicas: tuple[SQLBatchStore, SQLBatchStore], box: SecretBox
) -> None:
    first, second = [await webhook_store(store, box) for store in replicas]
    creates = [
        hooks.create_endpoint(ALICE, f"e{n}", "https://a.example/h", EVERY_TYPE, "whsec_eA==", n, 3)
        for n in range(8)
        for hooks in (first, second)
    ]
    made = [record for record in await asyncio.gather(*creates) if record is not None]
    assert len(made) == 3
    page = await second.page_endpoints(scope_of(ALICE), None, 10)
    assert page is not None and sorted(e.id for e in page[0]) == sorted(e.id for e in made)
