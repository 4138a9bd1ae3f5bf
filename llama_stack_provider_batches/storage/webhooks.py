"""Webhook endpoints, the events of batches that ended, and their deliveries, in the SQL database.

    <name>_webhook_endpoints   one row per user's endpoint: owner, URL, event types, sealed secret(s)
    <name>_webhook_hints       its `signing_secret_hint`, so that reading an endpoint never opens a secret
    <name>_events              an event, written in the transaction that ends its batch (sql_store.py)
    <name>_deliveries          one row per event and endpoint still to deliver: attempts, next try, lease

An event is fanned out once (`fan_out`): in one transaction its row is deleted and a delivery is
inserted for each endpoint that takes its type (the batch owner's endpoints, and the operator's);
of processes racing, the one whose DELETE matched does it. A delivery is claimed with a lease as
batches are (any process may deliver it), and deleted once delivered or given up: the tables hold
only work still to do. Secrets are sealed with the operator's key (secrets.py), and opened only to
sign: an endpoint whose secret this server cannot open (another key) can still be listed, read,
rotated and deleted.
"""

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Executable,
    Row,
    Select,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)

from ..domain.ownership import Owner, scope_of
from ..domain.webhook_events import secret_hint
from .database import Database, Written
from .secrets import SecretBox, SecretKeyError


@dataclass(frozen=True)
class EndpointRecord:
    """A stored endpoint, its secrets still sealed (`WebhookStore.signing_secrets` opens them)."""

    id: str
    owner: Owner | None
    name: str
    url: str
    event_types: list[str]
    secret_hint: str | None  # None: stored before hints were, with a secret this server cannot open
    sealed_secret: str
    sealed_previous: str | None  # a rotated secret still honoured (until previous_until)
    previous_until: float | None
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class OperatorEndpoint:
    """An endpoint of the operator's (run.yaml): it takes the events of every batch."""

    id: str
    url: str
    secret: str
    event_types: frozenset[str]


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: one event to one endpoint."""

    event_id: str
    endpoint_id: str
    type: str
    batch_id: str
    event_created_at: int
    attempts: int
    token: str


class WebhookStore:
    """Endpoints, events and deliveries."""

    def __init__(self, database: Database, box: SecretBox) -> None:
        self._db = database
        self._box = box
        self._hints = database.webhook_hints

    # --- endpoints ------------------------------------------------------------------------------

    async def create_endpoint(
        self, owner: Owner | None, name: str, url: str, event_types: list[str], secret: str, now: int, limit: int
    ) -> EndpointRecord | None:
        """A new endpoint; None if its owner has `limit` already (counted in the same transaction, so
        that creates racing cannot pass the limit together)."""
        sealed, hint, scope = self._box.seal(secret), secret_hint(secret), scope_of(owner)
        record = EndpointRecord(
            f"we_{uuid.uuid4().hex}", owner, name, url, event_types, hint, sealed, None, None, now, now
        )
        row = {
            "id": record.id,
            "scope": scope,
            "created_ns": time.time_ns(),
            "owner": owner.model_dump_json() if owner is not None else None,
            "name": name,
            "url": url,
            "event_types": json.dumps(event_types),
            "secret": sealed,
            "created_at": now,
            "updated_at": now,
        }
        lock = self._db.advisory_lock(f"webhook_endpoints/{scope}")
        writes: tuple[Executable, ...] = (
            *([lock] if lock is not None else []),
            self._db.endpoints.insert().values(**row),
            self._hints.insert().values(endpoint_id=record.id, hint=hint),
        )
        [(count,)] = await self._db.write_checked(writes, self._count_query(scope), lambda rows: rows[0][0] <= limit)
        return record if count <= limit else None

    async def get_endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        rows = await self._db.read(self._endpoints_query().where(self._db.endpoints.c.id == endpoint_id))
        return self._record(rows[0]) if rows else None

    def signing_secrets(self, endpoint: EndpointRecord, now: float) -> list[str]:
        """The secrets a delivery is signed with now. Raises SecretKeyError if one does not open."""
        until = endpoint.previous_until
        keep = endpoint.sealed_previous is not None and until is not None and now < until
        sealed = [endpoint.sealed_secret, endpoint.sealed_previous] if keep else [endpoint.sealed_secret]
        return [self._box.open(secret) for secret in sealed]  # type: ignore[arg-type]

    async def page_endpoints(
        self, scope: str, after: str | None, limit: int
    ) -> tuple[list[EndpointRecord], bool] | None:
        """A page of a scope's endpoints, newest first; None if `after` is not one of them."""
        table = self._db.endpoints
        query = self._endpoints_query().where(table.c.scope == scope)
        if after is not None:
            found = await self._db.read(select(table.c.created_ns).where(table.c.id == after, table.c.scope == scope))
            if not found:
                return None
            cursor = found[0].created_ns
            query = query.where(
                or_(table.c.created_ns < cursor, and_(table.c.created_ns == cursor, table.c.id < after))
            )
        rows = await self._db.read(query.order_by(table.c.created_ns.desc(), table.c.id.desc()).limit(limit + 1))
        return [self._record(row) for row in rows[:limit]], len(rows) > limit

    async def update_endpoint(
        self, endpoint_id: str, now: int, name: str | None, url: str | None, event_types: list[str] | None
    ) -> None:
        """Set what is given; `updated_at` moves only if something changes (as OpenAI's does)."""
        table = self._db.endpoints
        values: dict[str, object] = {}
        if name is not None:
            values["name"] = name
        if url is not None:
            values["url"] = url
        if event_types is not None:
            values["event_types"] = json.dumps(event_types)
        if values:
            changed = or_(*(table.c[column] != value for column, value in values.items()))
            await self._db.write(
                update(table).where(table.c.id == endpoint_id, changed).values(updated_at=now, **values)
            )

    async def rotate_secret(self, endpoint: EndpointRecord, secret: str, now: int, keep_old_for: float) -> None:
        """A new secret; the old one honoured `keep_old_for` seconds more, if this server can open it
        (rotating is also how an endpoint whose secret was sealed with another key is mended)."""
        table = self._db.endpoints
        values = {"secret": self._box.seal(secret), "updated_at": now, "previous_secret": None, "previous_until": None}
        if keep_old_for > 0 and self._opened(endpoint.sealed_secret) is not None:
            values |= {"previous_secret": endpoint.sealed_secret, "previous_until": time.time() + keep_old_for}
        hint = secret_hint(secret)
        set_hint = (
            self._db.insert(self._hints)
            .values(endpoint_id=endpoint.id, hint=hint)
            .on_conflict_do_update(index_elements=[self._hints.c.endpoint_id], set_={"hint": hint})
        )
        await self._db.write_if(update(table).where(table.c.id == endpoint.id).values(**values), set_hint)

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete an endpoint and its deliveries not yet made; whether it was there."""
        table, deliveries = self._db.endpoints, self._db.deliveries
        drop_deliveries = delete(deliveries).where(deliveries.c.endpoint_id == endpoint_id)
        drop_hint = delete(self._hints).where(self._hints.c.endpoint_id == endpoint_id)
        written = await self._db.write_if(delete(table).where(table.c.id == endpoint_id), drop_deliveries, drop_hint)
        return written.rowcount > 0

    def _count_query(self, scope: str) -> Executable:
        table = self._db.endpoints
        return select(func.count()).select_from(table).where(table.c.scope == scope)

    def _endpoints_query(self) -> Select[Any]:
        """Endpoints with their hints (none for those stored before hints were)."""
        table, hints = self._db.endpoints, self._hints
        return select(table, hints.c.hint).select_from(table.outerjoin(hints, hints.c.endpoint_id == table.c.id))

    def _record(self, row: Row[Any]) -> EndpointRecord:
        return EndpointRecord(
            id=row.id,
            owner=Owner.model_validate_json(row.owner) if row.owner else None,
            name=row.name,
            url=row.url,
            event_types=json.loads(row.event_types),
            secret_hint=row.hint if row.hint is not None else self._hint_of(row.secret),
            sealed_secret=row.secret,
            sealed_previous=row.previous_secret,
            previous_until=row.previous_until,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    def _hint_of(self, sealed: str) -> str | None:
        """The hint of an endpoint stored before hints were: from its secret, if it opens."""
        secret = self._opened(sealed)
        return secret_hint(secret) if secret is not None else None

    def _opened(self, sealed: str) -> str | None:
        """The secret, or None if this server's key does not open it."""
        try:
            return self._box.open(sealed)
        except SecretKeyError:
            return None

    # --- events ---------------------------------------------------------------------------------

    async def fan_out(self, operator: Iterable[OperatorEndpoint], limit: int = 100) -> int:
        """Turn up to `limit` events into deliveries, one per endpoint that takes each; how many events."""
        events, endpoints = self._db.events, self._db.endpoints
        rows = await self._db.read(select(events).order_by(events.c.created_at).limit(limit))
        operator = list(operator)
        by_scope: dict[str, list[tuple[str, list[str]]]] = {}  # read once per owner in this pass
        for event in rows:
            if event.scope not in by_scope:
                mine = await self._db.read(
                    select(endpoints.c.id, endpoints.c.event_types).where(endpoints.c.scope == event.scope)
                )
                by_scope[event.scope] = [(row.id, json.loads(row.event_types)) for row in mine]
            targets = [endpoint_id for endpoint_id, types in by_scope[event.scope] if event.type in types]
            targets += [endpoint.id for endpoint in operator if event.type in endpoint.event_types]
            inserts = [
                self._db.insert(self._db.deliveries)
                .values(
                    event_id=event.id,
                    endpoint_id=target,
                    type=event.type,
                    batch_id=event.batch_id,
                    event_created_at=event.created_at,
                    attempts=0,
                    next_attempt_at=self._db.now(),
                    lease_epoch=0,
                )
                .on_conflict_do_nothing()
                for target in targets
            ]
            # Of processes racing for the event, only the one whose DELETE matched inserts its deliveries.
            await self._db.write_if(delete(events).where(events.c.id == event.id), *inserts)
        return len(rows)

    # --- deliveries -----------------------------------------------------------------------------

    async def claim_due(self, count: int, lease_seconds: float, skip_endpoints: Iterable[str] = ()) -> list[Delivery]:
        """Up to `count` deliveries due now that nobody holds, each leased to this process."""
        table = self._db.deliveries
        now = self._db.now()
        free = or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at < now)
        query = select(table).where(table.c.next_attempt_at <= now, free)
        skipped = list(skip_endpoints)
        if skipped:
            query = query.where(table.c.endpoint_id.not_in(skipped))
        rows = await self._db.read(query.order_by(table.c.next_attempt_at).limit(count))
        claimed = []
        for row in rows:
            token = uuid.uuid4().hex
            take = (
                update(table)
                .where(table.c.event_id == row.event_id, table.c.endpoint_id == row.endpoint_id, free)
                .values(lease_token=token, lease_expires_at=now + lease_seconds, lease_epoch=table.c.lease_epoch + 1)
            )
            if (await self._db.write(take)).rowcount == 1:
                claimed.append(
                    Delivery(
                        row.event_id, row.endpoint_id, row.type, row.batch_id, row.event_created_at, row.attempts, token
                    )
                )
        return claimed

    async def delivered(self, delivery: Delivery) -> Written:
        """Forget a delivery that was made (or given up)."""
        return await self._db.write(delete(self._db.deliveries).where(*self._held(delivery)))

    async def release(self, delivery: Delivery) -> None:
        """Give a claimed delivery back untried: due at once, its attempts unchanged."""
        table = self._db.deliveries
        await self._db.write(update(table).where(*self._held(delivery)).values(lease_token=None, lease_expires_at=None))

    async def retry_later(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        table = self._db.deliveries
        later = (
            update(table)
            .where(*self._held(delivery))
            .values(
                attempts=delivery.attempts + 1,
                next_attempt_at=self._db.now() + delay_seconds,
                last_error=error[:500],
                lease_token=None,
                lease_expires_at=None,
            )
        )
        await self._db.write(later)

    async def pending(self) -> int:
        [(count,)] = await self._db.read(select(func.count()).select_from(self._db.deliveries))
        return int(count)

    def _held(self, delivery: Delivery) -> list[object]:
        table = self._db.deliveries
        return [
            table.c.event_id == delivery.event_id,
            table.c.endpoint_id == delivery.endpoint_id,
            table.c.lease_token == delivery.token,
        ]
