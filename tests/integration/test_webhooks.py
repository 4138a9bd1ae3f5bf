"""Webhooks against a real stack: events of every kind reach a receiver that verifies them with the
OpenAI SDK's `webhooks.unwrap`; the SDK's own calls manage an endpoint from create to delete; a
failing receiver gets the same event again; a server killed right after a batch ended still
delivers its event after the restart; a receiver that hangs costs one attempt and delays no other
endpoint; URLs that lead inside the machine, by address or by name, are refused unless the
operator allows them."""

import base64
import contextlib
import itertools
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from openai import InvalidWebhookSignatureError, OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, record, upload_jsonl, wait_for_batch
from tools.harness import ServerProcess, StandInControl, run_yaml_with_operator_webhooks, start_stack, warm_up
from tools.webhook_receiver import HANG, Received, WebhookReceiver

ALL_EVENTS = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
KEY = "q3Jkp1mC6vBqGz5R8tA0yVw2XhN4sLdE9uFjKoPiQbc="  # the sealing key, the same across restarts
SETTINGS = {
    "BATCHES_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
    "BATCHES_WEBHOOK_KEY": KEY,
    "BATCHES_WEBHOOK_FIRST_RETRY_SECONDS": "0.3",
    "BATCHES_COMPLETION_WINDOW_SECONDS": "6",  # a slow batch expires within the test
}


@pytest.fixture(scope="module")
def state(run_dir: Path) -> Path:
    return run_dir / f"webhooks-{uuid.uuid4().hex[:6]}"


def start(run_dir: Path, state: Path, standin_server: ServerProcess) -> ServerProcess:
    server = start_stack(run_dir, state, f"{standin_server.url}/v1", SETTINGS)
    warm_up(server)
    return server


@pytest.fixture(scope="module")
def server(run_dir: Path, state: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    server = start(run_dir, state, standin_server)
    yield server
    server.stop()


def client_of(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)


def test_every_kind_of_end_reaches_the_receiver_once_verified_by_the_sdk(
    server: ServerProcess, standin: StandInControl
) -> None:
    client = client_of(server)
    with WebhookReceiver() as receiver:
        endpoint = client.webhooks.create(name="all", url=receiver.url, event_types=ALL_EVENTS)
        try:
            completed = create_chat_batch(client, chat_lines(3))
            failed = client.batches.create(
                input_file_id=upload_jsonl(client, b"not json\n"),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            standin.configure(latency_mean=2.0)  # slower than the window of 6 s allows for 40 requests
            expired = create_chat_batch(client, chat_lines(40))
            cancelled = create_chat_batch(client, chat_lines(40))
            client.batches.cancel(cancelled.id)
            ended = {
                b.id: wait_for_batch(client, b.id, timeout=60).status for b in (completed, failed, expired, cancelled)
            }
            assert list(ended.values()) == ["completed", "failed", "expired", "cancelled"]
            receiver.wait_for(4, accepted=True)
            time.sleep(1.0)  # nothing more comes: each event once
            events = receiver.events(endpoint.signing_secret)
        finally:
            client.webhooks.delete(endpoint.id)
    assert sorted((e.data.id, e.type) for e in events) == sorted(
        (batch_id, f"batch.{status}") for batch_id, status in ended.items()
    )
    assert len({e.id for e in events}) == 4 and all(e.object == "event" for e in events)


def test_an_operators_endpoint_from_run_yaml_receives_every_batchs_events(
    run_dir: Path, standin_server: ServerProcess
) -> None:
    operator_secret = "whsec_" + base64.b64encode(b"the operator's own signing key!!").decode()
    with WebhookReceiver(path="/operator") as operator, WebhookReceiver() as users:
        endpoint = {"url": operator.url, "secret": operator_secret, "event_types": ["batch.completed"]}
        run_yaml = run_yaml_with_operator_webhooks(run_dir, [endpoint])
        state = run_dir / f"webhooks-operator-{uuid.uuid4().hex[:6]}"
        server = start_stack(run_dir, state, f"{standin_server.url}/v1", SETTINGS, run_yaml=run_yaml)
        try:
            warm_up(server)
            client = client_of(server)
            mine = client.webhooks.create(name="mine", url=users.url, event_types=["batch.completed"])
            with_endpoint = wait_for_batch(client, create_chat_batch(client, chat_lines(2)).id)
            users.wait_for(1, accepted=True)  # deleting the endpoint drops what it has not received
            client.webhooks.delete(mine.id)
            without = wait_for_batch(client, create_chat_batch(client, chat_lines(2)).id)
            operator.wait_for(2, accepted=True)
            listed = [endpoint.id for endpoint in client.webhooks.list()]
        finally:
            server.stop()
    # The operator's endpoint hears of every batch, signed with its own secret, and no user sees it.
    assert sorted(e.data.id for e in operator.events(operator_secret)) == sorted([with_endpoint.id, without.id])
    assert [e.data.id for e in users.events(mine.signing_secret)] == [with_endpoint.id]
    assert listed == []


def test_a_failing_receiver_gets_the_same_event_again_even_across_a_crash(
    run_dir: Path, standin_server: ServerProcess
) -> None:
    state = run_dir / f"webhooks-crash-{uuid.uuid4().hex[:6]}"
    server = start(run_dir, state, standin_server)
    client = client_of(server)
    with WebhookReceiver(500) as receiver:
        endpoint = client.webhooks.create(name="flaky", url=receiver.url, event_types=["batch.completed"])
        batch = create_chat_batch(client, chat_lines(2))
        wait_for_batch(client, batch.id)
        receiver.wait_for(3)  # three refusals, retried after 0.3, 0.6 s ...
        server.stop(signal.SIGKILL)  # the event is not delivered yet: it is in the store
        receiver.answer(200)
        restarted = start(run_dir, state, standin_server)
        try:
            accepted = receiver.wait_for(1, accepted=True, timeout=60)
            events = receiver.events(endpoint.signing_secret)
            client_of(restarted).webhooks.delete(endpoint.id)
        finally:
            restarted.stop()
    assert [e.data.id for e in events] == [batch.id]
    every = sorted(receiver.received, key=lambda r: r.at)  # the refused attempts too
    answered = [r.answered for r in every]
    first_accepted = answered.index(200)
    assert first_accepted >= 3 and set(answered[:first_accepted]) == {500}
    assert {r.headers["webhook-id"] for r in every} == {events[0].id}  # every attempt carried the same id
    assert {r.body for r in every} == {accepted[0].body}  # and the same event
    assert {e.id for e in receiver.events(endpoint.signing_secret, accepted=False)} == {events[0].id}
    gaps = [round(later.at - earlier.at, 2) for earlier, later in itertools.pairwise(every)]
    record(run_dir, "webhooks.json", "retries", {"answers": answered, "seconds_between_attempts": gaps})


def test_the_sdk_manages_an_endpoint_from_create_to_delete(server: ServerProcess) -> None:
    client = client_of(server)
    with WebhookReceiver() as first, WebhookReceiver() as second:
        created = client.webhooks.create(name="round trip", url=first.url, event_types=["batch.completed"])
        others = []
        try:
            assert created.signing_secret.startswith("whsec_")
            assert created.signing_secret_hint and created.signing_secret not in created.signing_secret_hint

            got = client.webhooks.retrieve(created.id)
            shown = ("id", "name", "url", "event_types", "created_at", "signing_secret_hint")
            assert {f: getattr(got, f) for f in shown} == {f: getattr(created, f) for f in shown}
            assert "signing_secret" not in got.to_dict()

            renamed = client.webhooks.update(created.id, name="renamed")
            assert (renamed.name, renamed.url, renamed.event_types) == ("renamed", first.url, ["batch.completed"])
            assert renamed.created_at == created.created_at
            assert renamed.signing_secret_hint == created.signing_secret_hint
            moved_to = ["batch.failed", "batch.cancelled"]
            moved = client.webhooks.update(created.id, url=second.url, event_types=moved_to)  # type: ignore[arg-type]
            assert (moved.name, moved.url, moved.event_types) == ("renamed", second.url, moved_to)
            assert moved.updated_at is not None and moved.updated_at >= created.created_at
            with pytest.raises(openai.BadRequestError) as refused:
                client.webhooks.update(created.id, url="https://169.254.169.254/latest/meta-data")
            assert refused.value.body["param"] == "url"  # type: ignore[index]
            got = client.webhooks.retrieve(created.id)
            assert (got.name, got.url, got.event_types) == (moved.name, moved.url, moved.event_types)
            assert "signing_secret" not in got.to_dict()

            def next_event(secret: str) -> Received:
                """The delivery, at the endpoint's new URL, of the event of a batch that fails now; verified
                with `secret`, as a receiver does with the SDK."""
                before = len(second.received)
                failed = client.batches.create(
                    input_file_id=upload_jsonl(client, b"not json\n"),
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
                delivery = second.wait_for(before + 1)[before]
                assert client.webhooks.unwrap(delivery.body, delivery.headers, secret=secret).data.id == failed.id
                return delivery

            rotated = client.webhooks.rotate_secret(created.id)
            assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != created.signing_secret
            assert client.webhooks.retrieve(created.id).signing_secret_hint == rotated.signing_secret_hint
            delivery = next_event(rotated.signing_secret)
            assert not first.received  # the old URL hears nothing
            with pytest.raises(InvalidWebhookSignatureError):  # the old secret is void at once
                client.webhooks.unwrap(delivery.body, delivery.headers, secret=created.signing_secret)

            previous = rotated
            rotated = client.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
            assert rotated.signing_secret not in (previous.signing_secret, created.signing_secret)
            delivery = next_event(rotated.signing_secret)
            client.webhooks.unwrap(delivery.body, delivery.headers, secret=previous.signing_secret)  # and the kept one
            with pytest.raises(InvalidWebhookSignatureError):
                client.webhooks.unwrap(delivery.body, delivery.headers, secret=created.signing_secret)

            others = [
                client.webhooks.create(name=f"page {n}", url=first.url, event_types=["batch.expired"]) for n in (2, 3)
            ]
            ours = [e.id for e in reversed([created, *others])]  # newest first
            page = client.webhooks.list(limit=2)
            assert len(page.data) == 2 and page.has_more
            following = page.get_next_page()
            assert not {e.id for e in page.data} & {e.id for e in following.data}
            listed = [e.id for e in client.webhooks.list(limit=2)]  # every page, fetched by the SDK
            assert len(listed) == len(set(listed)) and [i for i in listed if i in ours] == ours
            assert all("signing_secret" not in e.to_dict() for e in client.webhooks.list(limit=100).data)
            assert set(ALL_EVENTS) <= set(client.webhooks.event_types.list().data)

            deleted = client.webhooks.delete(created.id)
            assert (deleted.id, deleted.deleted) == (created.id, True)
            with pytest.raises(openai.NotFoundError):
                client.webhooks.retrieve(created.id)
            with pytest.raises(openai.NotFoundError):
                client.webhooks.update(created.id, name="gone")
            with pytest.raises(openai.NotFoundError):
                client.webhooks.delete(created.id)
            assert created.id not in [e.id for e in client.webhooks.list(limit=100)]
        finally:
            for endpoint in (created, *others):
                with contextlib.suppress(openai.NotFoundError):
                    client.webhooks.delete(endpoint.id)


def test_a_receiver_that_hangs_costs_one_attempt_and_delays_no_other(server: ServerProcess) -> None:
    client = client_of(server)
    with WebhookReceiver(HANG, 200) as hanging, WebhookReceiver() as other:
        slow = client.webhooks.create(name="hangs", url=hanging.url, event_types=["batch.completed"])
        fast = client.webhooks.create(name="answers", url=other.url, event_types=["batch.completed"])
        try:
            batch = create_chat_batch(client, chat_lines(2))
            assert wait_for_batch(client, batch.id).status == "completed"
            hanging.wait_hanging(1)
            other.wait_for(1, accepted=True)
            assert hanging.hanging == 1 and not hanging.received  # the other's event did not wait for it
            hanging.wait_for(2, timeout=60)
            time.sleep(1.0)  # nothing more comes: one attempt lost to the hang, then the retry
            attempts = sorted(hanging.received, key=lambda r: r.at)
        finally:
            client.webhooks.delete(slow.id)
            client.webhooks.delete(fast.id)
    assert [r.answered for r in attempts] == [HANG, 200]
    # The server held the hung attempt until its timeout (10 s by default), then gave up on it.
    assert attempts[0].closed_at is not None and attempts[0].closed_at - attempts[0].at >= 5
    assert len({r.headers["webhook-id"] for r in attempts}) == 1 and len({r.body for r in attempts}) == 1
    assert [e.data.id for e in hanging.events(slow.signing_secret)] == [batch.id]
    assert [e.data.id for e in other.events(fast.signing_secret)] == [batch.id]


def test_urls_inside_the_machine_are_refused_unless_allowed(server: ServerProcess) -> None:
    client = client_of(server)
    for url in ("http://127.0.0.2:9/hook", "https://169.254.169.254/latest/meta-data", "https://10.1.2.3/hook"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.webhooks.create(name="inside", url=url, event_types=["batch.completed"])
        assert refused.value.body["param"] == "url" and refused.value.body["code"] == "invalid_url"  # type: ignore[index]
    with WebhookReceiver() as receiver:  # 127.0.0.1 is on this server's allow list
        endpoint = client.webhooks.create(name="allowed", url=receiver.url, event_types=["batch.failed"])
        tested = client.webhooks.test(endpoint.id, event_type="batch.failed")
        client.webhooks.delete(endpoint.id)
    assert (tested.status_code, tested.success) == (200, True)
    assert [e.type for e in receiver.events(endpoint.signing_secret)] == ["batch.failed"]


def test_a_name_that_resolves_inside_is_refused_unless_allowed(
    run_dir: Path, server: ServerProcess, standin_server: ServerProcess
) -> None:
    # `localhost` resolves to a loopback address. With no allow list, as by default, it is refused.
    plain_state = run_dir / f"webhooks-plain-{uuid.uuid4().hex[:6]}"
    plain = start_stack(run_dir, plain_state, f"{standin_server.url}/v1", {"BATCHES_WEBHOOK_KEY": KEY})
    try:
        client = client_of(plain)
        for url in ("https://localhost/hook", "https://LOCALHOST.:8443/hook", "http://localhost:9/hook"):
            with pytest.raises(openai.BadRequestError) as refused:
                client.webhooks.create(name="inside", url=url, event_types=["batch.completed"])
            assert refused.value.body["param"] == "url" and refused.value.body["code"] == "invalid_url"  # type: ignore[index]
        # A name that does not resolve yet is accepted (its deliveries wait for it); moved to a name
        # that resolves inside, it is refused.
        later = client.webhooks.create(name="later", url="https://hooks.invalid/hook", event_types=["batch.expired"])
        with pytest.raises(openai.BadRequestError) as refused:
            client.webhooks.update(later.id, url="https://localhost/hook")
        assert refused.value.body["code"] == "invalid_url"  # type: ignore[index]
        assert client.webhooks.retrieve(later.id).url == "https://hooks.invalid/hook"
        client.webhooks.delete(later.id)
    finally:
        plain.stop()
    # The module's server allows `localhost` by name: accepted, and delivered to by that name.
    client = client_of(server)
    with WebhookReceiver() as receiver:
        port = urlsplit(receiver.url).port
        endpoint = client.webhooks.create(
            name="by name", url=f"http://localhost:{port}/hook", event_types=["batch.completed"]
        )
        try:
            tested = client.webhooks.test(endpoint.id, event_type="batch.completed")
        finally:
            client.webhooks.delete(endpoint.id)
    assert (tested.status_code, tested.success) == (200, True)
    [delivery] = receiver.received
    assert {k.lower(): v for k, v in delivery.headers.items()}["host"] == f"localhost:{port}"
    assert [e.type for e in receiver.events(endpoint.signing_secret)] == ["batch.completed"]
