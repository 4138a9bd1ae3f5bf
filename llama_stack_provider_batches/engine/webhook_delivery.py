"""Delivering webhook events: at least once, signed, with bounded retries, never in the way.

One task per process fans new events out to deliveries (storage/webhooks.py) and sends the ones
that are due, each under a lease, so any process may deliver any event and a crashed one's are
taken over when the lease runs out. A delivery is a POST of the signed event (webhook_events.py)
to the endpoint's URL, checked again now (webhook_urls.py: the name is resolved and every address
must be allowed, and the request goes to the checked address, so a name cannot be re-pointed
between check and connect); redirects are not followed. Only the answer's status is read, within
one deadline for the whole attempt (resolution, connection, request, status), so that a receiver
trickling bytes cannot keep an attempt alive past its lease. A 2xx ends it; anything else (an error
status, a timeout, a refused connection, a URL refused, a secret that does not open with this
server's key) is tried again after a pause that doubles from `webhooks.first_retry_seconds` up to
MAX_RETRY_SECONDS, with the same `webhook-id`, until `webhooks.retry_hours` after the event; then it
is dropped with a log line and a metric.

What keeps one receiver from delaying the others: every attempt has a timeout; at most
`max_concurrent_deliveries` are in flight per process, and at most PER_ENDPOINT_IN_FLIGHT of one
endpoint; deliveries never take a batch slot and run beside the batches on the serving loop.
"""

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from .. import telemetry
from ..config import WebhooksConfig
from ..domain.outages import log_failure
from ..domain.webhook_events import event_body, signed_headers
from ..domain.webhook_urls import AllowedHosts, Destination, UnsafeURL, check_url, resolve_allowed
from ..stack import get_logger
from ..storage.leases import wait_at_most
from ..storage.secrets import SecretKeyError
from ..storage.webhooks import Delivery, OperatorEndpoint, WebhookStore

logger = get_logger(name=__name__, category="providers")

MAX_RETRY_SECONDS = 3600.0
PER_ENDPOINT_IN_FLIGHT = 2
IDLE_POLL_SECONDS = 1.0  # how soon another process's events are noticed
PENDING_EVERY_PASSES = 10  # how often the pending-deliveries gauge is counted
DELIVERY_BOOKKEEPING_SECONDS = 5.0  # a delivery's lease beyond its attempt: recording the outcome
OPERATOR_PREFIX = "op_"


def operator_endpoints(config: WebhooksConfig) -> list[OperatorEndpoint]:
    """The operator's endpoints, with ids that stay the same across restarts (from their URL)."""
    return [
        OperatorEndpoint(
            OPERATOR_PREFIX + hashlib.sha256(endpoint.url.encode()).hexdigest()[:24],
            endpoint.url,
            endpoint.secret,
            frozenset(endpoint.event_types),
        )
        for endpoint in config.endpoints
    ]


def retry_delay(attempts: int, first: float = 5.0) -> float:
    """The pause after the `attempts`-th failed attempt: from `first`, doubling, capped, with jitter so
    that a receiver coming back is not hit by every retry at once."""
    base = min(MAX_RETRY_SECONDS, first * 2 ** min(max(0, attempts - 1), 32))
    return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Attempt:
    """How one attempt went: the receiver's status, or why there was none."""

    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def post_event(
    client: httpx.AsyncClient,
    destination: Destination,
    allowed: AllowedHosts,
    headers: dict[str, str],
    body: bytes,
    timeout: float,
) -> Attempt:
    """POST a signed event to the checked address of `destination`, all of it within `timeout` seconds
    (the client's own timeouts bound each read, not their sum: a receiver sending a byte at a time
    would never time out)."""
    try:
        async with asyncio.timeout(timeout):
            return await _post_event(client, destination, allowed, headers, body)
    except TimeoutError:
        return Attempt(None, f"No answer within {timeout:g} s")


async def _post_event(
    client: httpx.AsyncClient,
    destination: Destination,
    allowed: AllowedHosts,
    headers: dict[str, str],
    body: bytes,
) -> Attempt:
    try:
        addresses = await resolve_allowed(destination, allowed)
    except UnsafeURL as exc:
        return Attempt(None, str(exc))
    address = addresses[0]
    parts = urlsplit(destination.url)
    host = f"[{address}]" if ":" in address else address
    pinned = urlunsplit((parts.scheme, f"{host}:{destination.port}", parts.path or "/", parts.query, ""))
    default_port = 443 if destination.scheme == "https" else 80
    host_header = destination.host if destination.port == default_port else f"{destination.host}:{destination.port}"
    extensions = {"sni_hostname": destination.host} if destination.scheme == "https" else {}
    sending = client.stream(
        "POST", pinned, content=body, headers={**headers, "host": host_header}, extensions=extensions
    )
    try:
        # Streamed and its body never read: only the status counts, and the receiver chooses the body's size.
        async with sending as response:
            return Attempt(response.status_code)
    except httpx.HTTPError as exc:
        return Attempt(None, f"{type(exc).__name__}: {exc}"[:300])


@dataclass
class WebhookDeliverer:
    """Fans out events and delivers them, in this process, until stopped."""

    store: WebhookStore
    config: WebhooksConfig
    clock: Callable[[], float] = time.time
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _in_flight: dict[str, int] = field(default_factory=dict)  # by endpoint
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._operator = {endpoint.id: endpoint for endpoint in operator_endpoints(self.config)}
        self._allowed = AllowedHosts.parse(self.config.allowed_hosts)
        self.client = httpx.AsyncClient(
            follow_redirects=False, timeout=self.config.attempt_timeout_seconds, trust_env=False
        )

    def wake(self) -> None:
        """A batch ended here: look for its event now rather than at the next poll."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        failing, passes = False, 0
        while not stopping.is_set():
            self._wake.clear()
            try:
                await self.store.fan_out(self._operator.values())
                await self._send_due()
                if passes % PENDING_EVERY_PASSES == 0:
                    telemetry.set_webhook_pending(await self.store.pending())
                passes += 1
                failing = False
            except Exception as exc:
                if not failing:  # once per run of failures: an outage must not flood the log
                    log_failure(logger, "Cannot deliver webhook events; retrying", exc)
                failing = True
            await wait_at_most(self._wake, IDLE_POLL_SECONDS)
        await self.close()

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.config.attempt_timeout_seconds)
        await self.client.aclose()

    async def _send_due(self) -> None:
        room = self.config.max_concurrent_deliveries - len(self._tasks)
        if room <= 0:
            return
        busy = [endpoint for endpoint, count in self._in_flight.items() if count >= PER_ENDPOINT_IN_FLIGHT]
        # The attempt and its bookkeeping: a process that dies mid-attempt holds the delivery no longer.
        lease = self.config.attempt_timeout_seconds + DELIVERY_BOOKKEEPING_SECONDS
        for delivery in await self.store.claim_due(room, lease, busy):
            if self._in_flight.get(delivery.endpoint_id, 0) >= PER_ENDPOINT_IN_FLIGHT:
                await self.store.release(delivery)  # its endpoint is busy: back in the queue, no attempt used
                continue
            self._in_flight[delivery.endpoint_id] = self._in_flight.get(delivery.endpoint_id, 0) + 1
            task = asyncio.create_task(self._deliver(delivery))
            self._tasks.add(task)
            task.add_done_callback(lambda done, endpoint=delivery.endpoint_id: self._finished(done, endpoint))

    def _finished(self, task: asyncio.Task[None], endpoint_id: str) -> None:
        self._tasks.discard(task)
        self._in_flight[endpoint_id] -= 1
        if not self._in_flight[endpoint_id]:
            del self._in_flight[endpoint_id]
        if not task.cancelled() and task.exception() is not None:
            logger.warning("A webhook delivery failed to be recorded", error=str(task.exception())[:300])
        self._wake.set()  # room for more

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            target = await self._target(delivery.endpoint_id)
        except SecretKeyError:
            # Another key sealed it (a replica's, a lost one): a failed attempt, so that the retry period
            # still ends it; the endpoint's owner mends it by rotating its secret.
            logger.warning(
                "Cannot sign a webhook event: its endpoint's signing secret does not open with this server's key",
                endpoint_id=delivery.endpoint_id,
                event_id=delivery.event_id,
            )
            await self._failed(delivery, Attempt(None, "The endpoint's signing secret does not open with this key"))
            return
        if target is None:  # the endpoint was deleted since the event was fanned out
            await self.store.delivered(delivery)
            return
        attempt = await self._attempt(delivery, *target)
        if attempt.ok:
            await self.store.delivered(delivery)
            telemetry.webhook_delivered(delivery.type, "delivered", self.clock() - delivery.event_created_at)
            return
        await self._failed(delivery, attempt)

    async def _attempt(self, delivery: Delivery, url: str, signing_secrets: list[str]) -> Attempt:
        body = event_body(delivery.event_id, delivery.type, delivery.event_created_at, delivery.batch_id)
        headers = signed_headers(delivery.event_id, body, signing_secrets)
        try:
            destination = check_url(url, self._allowed)
        except UnsafeURL as exc:
            return Attempt(None, str(exc))
        timeout = self.config.attempt_timeout_seconds
        return await post_event(self.client, destination, self._allowed, headers, body, timeout)

    async def _failed(self, delivery: Delivery, attempt: Attempt) -> None:
        """Try again later, or drop the event once its retry period is over."""
        error = attempt.error or f"HTTP {attempt.status}"
        if self.clock() - delivery.event_created_at >= self.config.retry_hours * 3600:
            await self.store.delivered(delivery)
            telemetry.webhook_delivered(delivery.type, "dropped", None)
            logger.warning(
                "Webhook event dropped after its retry period",
                event_id=delivery.event_id,
                endpoint_id=delivery.endpoint_id,
                attempts=delivery.attempts + 1,
                error=error,
            )
            return
        telemetry.webhook_delivered(delivery.type, "retried", None)
        await self.store.retry_later(
            delivery, retry_delay(delivery.attempts + 1, self.config.first_retry_seconds), error
        )

    async def _target(self, endpoint_id: str) -> tuple[str, list[str]] | None:
        """The URL and signing secrets of an endpoint; None if it is gone. Raises SecretKeyError."""
        operator = self._operator.get(endpoint_id)
        if operator is not None:
            return operator.url, [operator.secret]
        endpoint = await self.store.get_endpoint(endpoint_id)
        if endpoint is None:
            return None
        return endpoint.url, self.store.signing_secrets(endpoint, time.time())
