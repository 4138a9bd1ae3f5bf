"""Webhook endpoints, the events of batches that ended, and their deliveries, in the SQL database.

    <name>_webhook_endpoints   one row per user's endpoint: owner, URL, event types, sealed secret(s)
    <name>_events              an event, written in the transaction that ends its batch (sql_store.py)
    <name>_deliveries          one row per event and endpoint still to deliver: attempts, next try, lease

An event is fanned out once (`fan_out`): in one transaction its row is deleted and a delivery is
inserted for each endpoint that takes its type (the batch owner's endpoints, and the operator's);
of processes racing, the one whose DELETE matched does it. A delivery is claimed with a lease as
batches are (any process may deliver it), and deleted once delivered or given up: the tables hold
only work still to do. Secrets are sealed with the operator's key (secrets.py).
"""

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, or_, select, update

from ..domain.ownership import Owner, scope_of
from .database import Database, Written
from .secrets import SecretBox


@dataclass(frozen=True)
class EndpointRecord:
    """A stored endpoint, its secrets opened."""

    id: str
    owner: Owner | None
    name: str
    url: str
    event_types: list[str]
    secret: str
    previous_secret: str | None  # a rotated secret still honoured (until previous_until)
    previous_until: float | None
    created_at: int
    updated_at: int

    def signing_secrets(self, now: float) -> list[str]:
        """The secrets a delivery is signed with now."""
        keep = self.previous_secret is not None and self.previous_until is not None and now < self.previous_until
        return [self.secret, self.previous_secret] if keep else [self.secret]  # type: ignore[list-item]


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

    # --- endpoints ------------------------------------------------------------------------------

    async def count_endpoints(self, scope: str) -> int:
        table = self._db.endpoints
        [(count,)] = await self._db.read(select(func.count()).select_from(table).where(table.c.scope == scope))
        return int(count)

    async def create_endpoint(
        self, owner: Owner | None, name: str, url: str, event_types: list[str], secret: str, now: int
    ) -> EndpointRecord:
        record = EndpointRecord(f"we_{uuid.uuid4().hex}", owner, name, url, event_types, secret, None, None, now, now)
        row = {
            "id": record.id,
            "scope": scope_of(owner),
            "created_ns": time.time_ns(),
            "owner": owner.model_dump_json() if owner is not None else None,
            "name": name,
            "url": url,
            "event_types": json.dumps(event_types),
            "secret": self._box.seal(secret),
            "created_at": now,
            "updated_at": now,
        }
        await self._db.write(self._db.endpoints.insert().values(**row))
        return record

    async def get_endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        table = self._db.endpoints
        rows = await self._db.read(select(table).where(table.c.id == endpoint_id))
        return self._record(rows[0]) if rows else None

    async def page_endpoints(
        self, scope: str, after: str | None, limit: int
    ) -> tuple[list[EndpointRecord], bool] | None:
        """A page of a scope's endpoints, newest first; None if `after` is not one of them."""
        table = self._db.endpoints
        query = select(table).where(table.c.scope == scope)
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
        table = self._db.endpoints
        values: dict[str, object] = {}
        if name is not None:
            values["name"] = name
        if url is not None:
            values["url"] = url
        if event_types is not None:
            values["event_types"] = json.dumps(event_types)
        if values:
            await self._db.write(update(table).where(table.c.id == endpoint_id).values(updated_at=now, **values))

    async def rotate_secret(self, endpoint: EndpointRecord, secret: str, now: int, keep_old_for: float) -> None:
        table = self._db.endpoints
        values = {"secret": self._box.seal(secret), "updated_at": now, "previous_secret": None, "previous_until": None}
        if keep_old_for > 0:
            values |= {"previous_secret": self._box.seal(endpoint.secret), "previous_until": time.time() + keep_old_for}
        await self._db.write(update(table).where(table.c.id == endpoint.id).values(**values))

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete an endpoint and its deliveries not yet made; whether it was there."""
        table, deliveries = self._db.endpoints, self._db.deliveries
        drop_deliveries = delete(deliveries).where(deliveries.c.endpoint_id == endpoint_id)
        written = await self._db.write_if(delete(table).where(table.c.id == endpoint_id), drop_deliveries)
        return written.rowcount > 0

    def _record(self, row: object) -> EndpointRecord:
        previous = row.previous_secret  # type: ignore[attr-defined]
        return EndpointRecord(
            id=row.id,  # type: ignore[attr-defined]
            owner=Owner.model_validate_json(row.owner) if row.owner else None,  # type: ignore[attr-defined]
            name=row.name,  # type: ignore[attr-defined]
            url=row.url,  # type: ignore[attr-defined]
            event_types=json.loads(row.event_types),  # type: ignore[attr-defined]
            secret=self._box.open(row.secret),  # type: ignore[attr-defined]
            previous_secret=self._box.open(previous) if previous else None,
            previous_until=row.previous_until,  # type: ignore[attr-defined]
            created_at=row.created_at,  # type: ignore[attr-defined]
            updated_at=row.updated_at,  # type: ignore[attr-defined]
        )

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
