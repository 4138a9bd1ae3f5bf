"""Webhooks against a real stack: events of every kind reach a receiver that verifies them with the
OpenAI SDK's `webhooks.unwrap`; a failing receiver gets the same event again; a server killed
right after a batch ended still delivers its event after the restart; URLs that lead inside the
machine are refused unless the operator allows them."""

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, upload_jsonl, wait_for_batch
from tools.harness import ServerProcess, StandInControl, start_stack, warm_up
from tools.webhook_receiver import WebhookReceiver

ALL_EVENTS = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
KEY = "q3Jkp1mC6vBqGz5R8tA0yVw2XhN4sLdE9uFjKoPiQbc="  # the sealing key, the same across restarts
SETTINGS = {
    "BATCHES_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
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
    assert len({r.headers["webhook-id"] for r in accepted}) == 1  # every attempt carried the same id
    assert len(receiver.received) >= 4


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
