"""`/v1/webhook_endpoints`: OpenAI's webhook endpoints API, for the events of batches.

    POST   /v1/webhook_endpoints                        create (the signing secret is shown this once)
    GET    /v1/webhook_endpoints                        list the caller's, newest first
    GET    /v1/webhook_endpoints/{id}                   retrieve
    POST   /v1/webhook_endpoints/{id}                   update name, url, event_types
    DELETE /v1/webhook_endpoints/{id}                   delete
    POST   /v1/webhook_endpoints/{id}/rotate_secret     a new secret; the old one honoured 24 h if asked
    POST   /v1/webhook_endpoints/{id}/test              send a sample event now; the receiver's status
    GET    /v1/webhook_event_types                      the event types this server sends

Endpoints belong to their creator, under the stack's access policy as batches are (ownership.py):
one the caller may not see is reported missing. A user's endpoints receive the events of that
user's batches only. Secrets never leave the server again after create and rotate: objects carry
OpenAI's `signing_secret_hint`.
"""

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from ..config import WebhooksConfig
from ..domain.errors import InvalidParameterError, LimitReachedError, WebhookEndpointNotFoundError
from ..domain.ownership import check_may_create, current_owner, may, scope_of
from ..domain.webhook_events import EVENT_TYPES, event_body, new_event_id, new_secret, secret_hint, signed_headers
from ..domain.webhook_urls import (
    AllowedHosts,
    Destination,
    Resolver,
    Unresolvable,
    UnsafeURL,
    check_url,
    resolve_allowed,
    resolve_host,
)
from ..engine.webhook_delivery import post_event
from ..stack import AccessRule, Action
from ..storage.secrets import SecretKeyError
from ..storage.webhooks import EndpointRecord, WebhookStore
from .http_errors import OpenAIErrorRoute, routes_answering_openai_errors

MAX_NAME_LENGTH = 256
KEEP_OLD_SECRET_SECONDS = 24 * 3600
KIND = "webhook_endpoint"
ID_PREFIX = "we_"


class CreateEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    url: str
    event_types: list[str]


class UpdateEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    url: str | None = None
    event_types: list[str] | None = None


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_old_secret_active_for_24_hours: bool = False


class TestEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: str


def endpoint_object(record: EndpointRecord, secret: str | None = None) -> dict[str, Any]:
    """An endpoint as OpenAI's `WebhookEndpoint` (with `signing_secret` only right after create or rotate)."""
    shown = {
        "id": record.id,
        "object": "webhook_endpoint",
        "name": record.name,
        "url": record.url,
        "event_types": record.event_types,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "signing_secret_hint": secret_hint(secret) if secret is not None else record.secret_hint,
    }
    return shown | ({"signing_secret": secret} if secret is not None else {})


class WebhookEndpoints:
    """The endpoints API over the store, for the caller in the request context."""

    def __init__(
        self,
        store: WebhookStore,
        config: WebhooksConfig,
        policy: list[AccessRule],
        clock: Callable[[], float] = time.time,
        resolve: Resolver = resolve_host,
    ) -> None:
        self._store = store
        self._resolve = resolve
        self._config = config
        self._policy = policy
        self._clock = clock
        self._allowed = AllowedHosts.parse(config.allowed_hosts)

    async def create(self, params: CreateEndpoint) -> dict[str, Any]:
        name, event_types = self._name(params.name), self._event_types(params.event_types)
        url = await self._url(params.url)
        check_may_create(self._policy, ID_PREFIX)
        limit, secret = self._config.max_endpoints_per_user, new_secret()
        record = await self._store.create_endpoint(
            current_owner(), name, url, event_types, secret, int(self._clock()), limit
        )
        if record is None:
            raise LimitReachedError(f"You have reached the limit of {limit} webhook endpoints; delete one first.")
        return endpoint_object(record, secret)

    async def retrieve(self, endpoint_id: str) -> dict[str, Any]:
        return endpoint_object(await self._visible(endpoint_id, Action.READ))

    async def page(self, after: str | None, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise InvalidParameterError("limit", "Invalid 'limit': must be between 1 and 100.", "integer_out_of_range")
        page = await self._store.page_endpoints(scope_of(current_owner()), after, limit)
        if page is None:
            raise InvalidParameterError("after", f"No webhook endpoint with id {after!r} to list after.")
        records, has_more = page
        data = [endpoint_object(r) for r in records if may(self._policy, Action.READ, r.id, r.owner, KIND)]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}

    async def update(self, endpoint_id: str, params: UpdateEndpoint) -> dict[str, Any]:
        await self._visible(endpoint_id, Action.UPDATE)
        name = self._name(params.name) if params.name is not None else None
        url = await self._url(params.url) if params.url is not None else None
        event_types = self._event_types(params.event_types) if params.event_types is not None else None
        await self._store.update_endpoint(endpoint_id, int(self._clock()), name, url, event_types)
        return await self.retrieve(endpoint_id)

    async def delete(self, endpoint_id: str) -> dict[str, Any]:
        await self._visible(endpoint_id, Action.DELETE)
        deleted = await self._store.delete_endpoint(endpoint_id)
        return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": deleted}

    async def rotate_secret(self, endpoint_id: str, params: RotateSecret) -> dict[str, Any]:
        record = await self._visible(endpoint_id, Action.UPDATE)
        secret = new_secret()
        keep = KEEP_OLD_SECRET_SECONDS if params.keep_old_secret_active_for_24_hours else 0
        await self._store.rotate_secret(record, secret, int(self._clock()), keep)
        return endpoint_object(await self._visible(endpoint_id, Action.READ), secret)

    async def test(self, endpoint_id: str, params: TestEndpoint, client: Any) -> dict[str, Any]:
        """Send a sample event of `event_type` now, signed as a real one; answer the receiver's status."""
        record = await self._visible(endpoint_id, Action.UPDATE)
        [event_type] = self._event_types([params.event_type], "event_type")
        event_id, created_at = new_event_id(), int(self._clock())
        body = event_body(event_id, event_type, created_at, f"batch_test_{event_id[4:16]}")
        headers = signed_headers(event_id, body, self._signing_secrets(record))
        timeout = self._config.attempt_timeout_seconds
        attempt = await post_event(client, self._destination(record.url), self._allowed, headers, body, timeout)
        if attempt.status is None:
            message = f"The webhook endpoint could not be reached: {attempt.error}"
            raise InvalidParameterError("url", message, "webhook_endpoint_unreachable")
        return {
            "object": "webhook_endpoint.test",
            "event_type": event_type,
            "status_code": attempt.status,
            "success": True,
            "webhook_endpoint_id": endpoint_id,
        }

    # --- checks ---------------------------------------------------------------------------------

    async def _visible(self, endpoint_id: str, action: Action) -> EndpointRecord:
        record = await self._store.get_endpoint(endpoint_id) if endpoint_id.startswith(ID_PREFIX) else None
        if record is None or not may(self._policy, action, endpoint_id, record.owner, KIND):
            raise WebhookEndpointNotFoundError(endpoint_id)
        return record

    def _signing_secrets(self, record: EndpointRecord) -> list[str]:
        try:
            return self._store.signing_secrets(record, time.time())
        except SecretKeyError:
            message = "This server cannot open the endpoint's signing secret (its key changed); rotate the secret."
            raise InvalidParameterError("webhook_endpoint_id", message, "signing_secret_unavailable") from None

    def _name(self, name: str) -> str:
        if not name.strip() or len(name) > MAX_NAME_LENGTH:
            raise InvalidParameterError("name", f"The name must be 1 to {MAX_NAME_LENGTH} characters.")
        return name

    async def _url(self, url: str) -> str:
        """A URL to register: its form, and the addresses its host resolves to now (each delivery
        checks them again). A name that does not resolve yet is accepted: its deliveries wait for it."""
        destination = self._destination(url)
        try:
            await resolve_allowed(destination, self._allowed, self._resolve)
        except Unresolvable:
            pass
        except UnsafeURL as exc:
            raise InvalidParameterError("url", str(exc), "invalid_url") from None
        return url

    def _destination(self, url: str) -> Destination:
        try:
            return check_url(url, self._allowed)
        except UnsafeURL as exc:
            raise InvalidParameterError("url", str(exc), "invalid_url") from None

    @staticmethod
    def _event_types(event_types: list[str], param: str = "event_types") -> list[str]:
        if not event_types:
            raise InvalidParameterError(param, "At least one event type is required.", "empty_array")
        unknown = [t for t in event_types if t not in EVENT_TYPES]
        if unknown:
            message = f"This server sends batch events only ({', '.join(EVENT_TYPES)}); not {unknown[0]!r}."
            raise InvalidParameterError(param, message, "invalid_value")
        return list(dict.fromkeys(event_types))


def webhook_routes(endpoints: WebhookEndpoints, client_of: Callable[[], Any]) -> APIRouter:
    """The routes of the endpoints API, answering errors in OpenAI's shape; under the batches
    router's prefix (`/v1`)."""
    router = APIRouter(route_class=OpenAIErrorRoute)

    @router.post("/webhook_endpoints")
    async def create(params: CreateEndpoint) -> dict[str, Any]:
        return await endpoints.create(params)

    @router.get("/webhook_endpoints")
    async def list_endpoints(after: str | None = Query(None), limit: int = Query(20)) -> dict[str, Any]:
        return await endpoints.page(after, limit)

    @router.get("/webhook_endpoints/{endpoint_id}")
    async def retrieve(endpoint_id: str) -> dict[str, Any]:
        return await endpoints.retrieve(endpoint_id)

    @router.post("/webhook_endpoints/{endpoint_id}")
    async def update(endpoint_id: str, params: UpdateEndpoint) -> dict[str, Any]:
        return await endpoints.update(endpoint_id, params)

    @router.delete("/webhook_endpoints/{endpoint_id}")
    async def delete(endpoint_id: str) -> dict[str, Any]:
        return await endpoints.delete(endpoint_id)

    @router.post("/webhook_endpoints/{endpoint_id}/rotate_secret")
    async def rotate_secret(endpoint_id: str, params: RotateSecret | None = None) -> dict[str, Any]:
        return await endpoints.rotate_secret(endpoint_id, params or RotateSecret())

    @router.post("/webhook_endpoints/{endpoint_id}/test")
    async def test(endpoint_id: str, params: TestEndpoint) -> dict[str, Any]:
        return await endpoints.test(endpoint_id, params, client_of())

    @router.get("/webhook_event_types")
    async def event_types() -> dict[str, Any]:
        return {"object": "list", "data": list(EVENT_TYPES)}

    return router


def batches_and_webhook_routes(impl: Any) -> APIRouter:
    """The stack's `/v1/batches` routes over `impl` (the BatchesService), with the endpoints API's
    beside them: the stack builds a provider's routes from one factory per API."""
    router = routes_answering_openai_errors(impl)
    if getattr(impl, "webhooks", None) is not None:
        router.include_router(webhook_routes(impl.webhooks, lambda: impl.webhook_client))
    return router
