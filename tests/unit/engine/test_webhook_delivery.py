import asyncio
import time
from typing import Any, ClassVar

import httpx
import pytest
from cryptography.fernet import Fernet
from openai import OpenAI
from openai.types.batch_request_counts import BatchRequestCounts
from sqlalchemy import select

from llama_stack_provider_batches.config import OperatorWebhookEndpoint, WebhooksConfig
from llama_stack_provider_batches.domain.lifecycle import transition
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.engine import webhook_delivery
from llama_stack_provider_batches.engine.webhook_delivery import WebhookDeliverer, retry_delay
from llama_stack_provider_batches.storage.secrets import SecretBox
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.fake_http import FakeHandler, FakeServer, serving
from tests.unit.helpers import make_batch

SECRET = "whsec_dGVzdC1zZWNyZXQtdGVzdC1zZWNyZXQ="
CLIENT = OpenAI(api_key="none", base_url="http://127.0.0.1:9/v1")
ALL = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]


class Receiver:
    """Answers deliveries with the statuses given, in turn (the last one from then on)."""

    def __init__(self, *statuses: int, delay: float = 0.0, gate: asyncio.Event | None = None) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.gate = gate  # when given, answers wait for it
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status, headers={"location": "http://127.0.0.1:1/elsewhere"})


class Trickling(FakeHandler):
    """Takes a delivery, then answers a byte every 50 ms (each well within the client's read timeout)
    for 30 s or until the client hangs up: the status line and headers, or, `status_first`, a 200 at
    once and then the body."""

    status_first: ClassVar[bool] = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        if self.status_first:
            self.send_response(200)
            self.send_header("content-length", "1000000")
            self.end_headers()
        answer = b"x" if self.status_first else b"HTTP/1.1 200 OK\r\nx-slow: y\r\n"
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                for byte in answer:
                    self.wfile.write(bytes([byte]))
                    time.sleep(0.05)
        except OSError:  # the client hung up
            pass


class TricklingBody(Trickling):
    status_first = True


def deliverer_for(store: SQLBatchStore, receiver: Receiver | None, url: str, **settings: object) -> WebhookDeliverer:
    """A deliverer to an operator endpoint at `url`: through `receiver`, or over the network without one."""
    config = WebhooksConfig(
        allowed_hosts=["127.0.0.1"],
        endpoints=[OperatorWebhookEndpoint(url=url, secret=SECRET, event_types=ALL)],
        **settings,  # type: ignore[arg-type]
    )
    deliverer = WebhookDeliverer(store.webhook_store(SecretBox(Fernet.generate_key())), config)
    if receiver is not None:
        deliverer.client = httpx.AsyncClient(transport=httpx.MockTransport(receiver), follow_redirects=False)
    return deliverer


async def delivery_rows(store: SQLBatchStore) -> list[Any]:
    return list(await store._db.read(select(store._db.deliveries)))


async def end_batch(store: SQLBatchStore, batch_id: str, status: str = "completed") -> None:
    counts = BatchRequestCounts(total=1, completed=1, failed=0)
    await store.create(StoredBatch(batch=make_batch(batch_id, status="finalizing", request_counts=counts)))
    await store.update_record(
        batch_id,
        lambda s: s.model_copy(update={"batch": transition(s.batch, status, 1)}),  # type: ignore[arg-type]
    )


async def one_pass(deliverer: WebhookDeliverer) -> None:
    await deliverer.store.fan_out(deliverer._operator.values())
    await deliverer._send_due()
    await asyncio.gather(*deliverer._tasks)


async def test_a_failing_receiver_gets_the_same_event_id_again_until_it_answers_2xx(
    store: SQLBatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_delivery, "retry_delay", lambda attempts, first: 0.0)
    receiver = Receiver(500, 500, 500, 200)
    deliverer = deliverer_for(store, receiver, "http://127.0.0.1:9000/hook?x=1")
    await end_batch(store, "batch_r", "failed")
    for _ in range(4):
        await one_pass(deliverer)
    assert len(receiver.requests) == 4 and await deliverer.store.pending() == 0
    ids = {request.headers["webhook-id"] for request in receiver.requests}
    assert len(ids) == 1  # receivers drop repeats by it
    last = receiver.requests[-1]
    assert str(last.url) == "http://127.0.0.1:9000/hook?x=1" and last.headers["host"] == "127.0.0.1:9000"
    event = CLIENT.webhooks.unwrap(last.content, dict(last.headers), secret=SECRET)
    assert (event.type, event.data.id) == ("batch.failed", "batch_r")
    await one_pass(deliverer)
    assert len(receiver.requests) == 4  # delivered: never sent again


async def test_a_redirect_is_not_followed_and_counts_as_a_failure(store: SQLBatchStore) -> None:
    receiver = Receiver(302)
    deliverer = deliverer_for(store, receiver, "http://127.0.0.1:9000/hook")
    await end_batch(store, "batch_s")
    await one_pass(deliverer)
    assert [str(r.url) for r in receiver.requests] == ["http://127.0.0.1:9000/hook"]
    assert await deliverer.store.pending() == 1


async def test_an_event_past_its_retry_period_is_dropped_after_its_last_failure(store: SQLBatchStore) -> None:
    receiver = Receiver(503)
    deliverer = deliverer_for(store, receiver, "http://127.0.0.1:9000/hook", retry_hours=1.0)
    deliverer.clock = lambda: time.time() + 3601
    await end_batch(store, "batch_o")
    await one_pass(deliverer)
    assert len(receiver.requests) == 1 and await deliverer.store.pending() == 0


async def test_a_url_that_is_no_longer_allowed_is_not_sent_to_and_is_retried(store: SQLBatchStore) -> None:
    receiver = Receiver(200)
    deliverer = deliverer_for(store, receiver, "http://127.0.0.2:9000/hook")  # outside the allow list
    await end_batch(store, "batch_u")
    await one_pass(deliverer)
    assert receiver.requests == [] and await deliverer.store.pending() == 1


async def test_a_slow_receiver_does_not_hold_up_another(store: SQLBatchStore) -> None:
    held = asyncio.Event()
    slow, fast = Receiver(200, gate=held), Receiver(200)

    async def route(request: httpx.Request) -> httpx.Response:
        return await (slow if request.url.port == 9001 else fast)(request)

    config = WebhooksConfig(
        allowed_hosts=["127.0.0.1"],
        max_concurrent_deliveries=4,
        endpoints=[
            OperatorWebhookEndpoint(url="http://127.0.0.1:9001/slow", secret=SECRET, event_types=ALL),
            OperatorWebhookEndpoint(url="http://127.0.0.1:9002/fast", secret=SECRET, event_types=ALL),
        ],
    )
    deliverer = WebhookDeliverer(store.webhook_store(SecretBox(Fernet.generate_key())), config)
    deliverer.client = httpx.AsyncClient(transport=httpx.MockTransport(route))
    for n in range(4):
        await end_batch(store, f"batch_{n}")
    await deliverer.store.fan_out(deliverer._operator.values())
    started = time.monotonic()
    await deliverer._send_due()  # 4 slots: at most 2 for the slow endpoint, the rest for the fast one
    while len(fast.requests) < 2 and time.monotonic() - started < 10:
        await asyncio.sleep(0.01)
    # The fast endpoint got its deliveries while the slow one still holds both of its own.
    assert len(fast.requests) == 2 and len(slow.requests) == 2
    assert sum(not task.done() for task in deliverer._tasks) == 2  # the slow endpoint's two, still held
    held.set()
    await asyncio.gather(*deliverer._tasks)


async def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_attempt_timeout_and_retried(
    store: SQLBatchStore,
) -> None:
    with serving(FakeServer(Trickling)) as server:
        deliverer = deliverer_for(store, None, f"http://127.0.0.1:{server.port}/hook", attempt_timeout_seconds=0.5)
        await end_batch(store, "batch_t")
        started = time.monotonic()
        async with asyncio.timeout(5):  # the attempt used to last as long as the bytes kept coming
            await one_pass(deliverer)
        assert time.monotonic() - started < 2
        [row] = await delivery_rows(store)
        assert (row.attempts, row.last_error) == (1, "No answer within 0.5 s")  # tried again later
        await deliverer.close()


async def test_a_2xx_counts_at_once_however_long_its_body(store: SQLBatchStore) -> None:
    with serving(FakeServer(TricklingBody)) as server:
        deliverer = deliverer_for(store, None, f"http://127.0.0.1:{server.port}/hook", attempt_timeout_seconds=2)
        await end_batch(store, "batch_b")
        started = time.monotonic()
        async with asyncio.timeout(5):  # the whole body used to be read, into memory
            await one_pass(deliverer)
        assert time.monotonic() - started < 1 and await deliverer.store.pending() == 0
        await deliverer.close()


async def test_a_secret_this_server_cannot_open_fails_its_attempts_until_the_event_is_dropped(
    store: SQLBatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_delivery, "retry_delay", lambda attempts, first: 0.0)
    warnings: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(
        webhook_delivery.logger, "warning", lambda message, **fields: warnings.append((message, fields))
    )
    receiver = Receiver(200)
    deliverer = WebhookDeliverer(
        store.webhook_store(SecretBox(Fernet.generate_key())),
        WebhooksConfig(allowed_hosts=["127.0.0.1"], retry_hours=1),
    )
    deliverer.client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    sealed_elsewhere = store.webhook_store(SecretBox(Fernet.generate_key()))  # another replica's key
    await store._db.create_tables()
    endpoint = await sealed_elsewhere.create_endpoint(None, "e", "http://127.0.0.1:9000/hook", ALL, SECRET, 1, 10)
    assert endpoint is not None
    await end_batch(store, "batch_k")
    await one_pass(deliverer)
    [row] = await delivery_rows(store)
    assert receiver.requests == [] and row.attempts == 1 and "does not open" in row.last_error
    [(message, fields)] = warnings
    assert fields["endpoint_id"] == endpoint.id and "secret" in message and SECRET not in str(warnings)
    deliverer.clock = lambda: time.time() + 3601  # past its retry period: dropped, as any failing delivery
    await one_pass(deliverer)
    assert await deliverer.store.pending() == 0 and receiver.requests == []


def test_retries_back_off_from_seconds_to_an_hour() -> None:
    delays = [retry_delay(n) for n in range(1, 20)]
    assert 4 <= delays[0] <= 6 and all(d <= 3600 * 1.2 for d in delays) and delays[-1] >= 3600 * 0.8
