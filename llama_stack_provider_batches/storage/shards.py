"""Shards: the ranges of a running batch's requests, each run under a lease of its own, so that one
batch uses every process (worker or replica) that has a free slot.

When a batch passes validation its job splits it into shards of `requests_per_shard` requests, one
row each in the shards table (database.py, written once: a row and its lease epoch are never
replaced), and then runs them one after the other; any other
process with a free slot may claim a shard of it meanwhile and run it (runner.py). A shard's lease
works as a batch's does (sql_store.py): claim is one conditional UPDATE (the shard is not done,
nobody holds it, its batch is in progress and not past its deadline), renew extends it only while
the token matches, and the database's clock judges expiry. Renewing a shard's lease also
reads its batch's status, which is how a cancel reaches every process running a part of it.

A shard is `done` once every one of its requests has a stored result; a job stopped early
(cancel, expiry, shutdown, a crash) leaves it not done, for whoever claims it next. Each shard row
keeps the tally of its stored results, so a batch's progress is the sum over its shards.
A batch created with per-request credentials has shards that are not `shareable`: only its own
job, in the process holding those credentials, runs them.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, or_, select, update

from ..domain.lifecycle import UNFINISHED_STATUSES
from ..domain.results import Tally
from ..stack import BatchObject
from .database import Database
from .token_quota import OverTokenLimit, TokenQuota

CLAIMABLE_STATUSES = ("in_progress",)  # a shard is claimed only while its batch runs


@dataclass(frozen=True)
class ShardLease:
    """The right to run one shard: requests `first` to `end - 1` of batch `batch_id`."""

    batch_id: str
    shard: int
    first: int
    end: int
    token: str
    epoch: int  # results of this claim are written under it (store.ResultChunks)


@dataclass(frozen=True)
class ShardTokens:
    """A batch's estimated input tokens, per shard and model, and the limits its owner's count must stay within."""

    scope: str
    per_shard: list[dict[str, int]]
    limit_of: Callable[[str], int | None]


@dataclass(frozen=True)
class ShardsState:
    """How far a batch's shards are: how many are not done, and how many of those someone holds."""

    open: int
    held: int


def split(total: int, requests_per_shard: int) -> list[tuple[int, int]]:
    """The (first, end) ranges of a batch of `total` requests: at least one, even for no request."""
    if total == 0:
        return [(0, 0)]
    return [(first, min(first + requests_per_shard, total)) for first in range(0, total, requests_per_shard)]


class ShardStore:
    """Shard rows: creation, leases, progress."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._table = database.shards
        self.tokens = TokenQuota(database)

    async def create(
        self,
        batch: BatchObject,
        ranges: list[tuple[int, int]],
        batch_created_ns: int,
        shareable: bool,
        tokens: ShardTokens | None = None,
    ) -> OverTokenLimit | None:
        """Write a batch's shards, unless it has some already (an interrupted validation wrote them, or
        another process's job did): rows are never replaced, so a lease epoch never starts over.

        With `tokens`, the shards' token estimates are written with them, and nothing is written if the
        batch takes its owner past a limit: which one is returned."""
        if await self.exist(batch.id):
            return None
        rows = [
            {
                "batch_id": batch.id,
                "shard": number,
                "first": first,
                "end": end,
                "batch_created_ns": batch_created_ns,
                "shareable": shareable,
                "expires_at": batch.expires_at,
                "done": False,
                "lease_epoch": 0,
                "completed": 0,
                "failed": 0,
                "input_tokens": 0,
                "output_tokens": 0,
            }
            for number, (first, end) in enumerate(ranges)
        ]
        insert = self._db.insert(self._table).values(rows).on_conflict_do_nothing()
        if tokens is None:
            await self._db.write(insert)
            return None
        return await self.tokens.write_within(tokens.scope, insert, batch.id, tokens.per_shard, tokens.limit_of)

    async def exist(self, batch_id: str) -> bool:
        rows = await self._db.read(select(self._table.c.shard).where(self._table.c.batch_id == batch_id).limit(1))
        return bool(rows)

    def _free(self) -> ColumnElement[bool]:
        """Not done, nobody holds it, its batch is running and not past its deadline (the database's clock)."""
        table, batches = self._table, self._db.batches
        running = select(batches.c.id).where(batches.c.status.in_(CLAIMABLE_STATUSES))
        return and_(
            table.c.done.is_(False),
            or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at < self._db.now()),
            or_(table.c.expires_at.is_(None), table.c.expires_at > self._db.now()),
            table.c.batch_id.in_(running),
        )

    async def requests_left(self, scope: str) -> int:
        """Requests not yet run in the running batches of an owner's scope (as far as shards reported)."""
        table, batches = self._table, self._db.batches
        running = select(batches.c.id).where(batches.c.scope == scope, batches.c.status == "in_progress")
        left = func.coalesce(func.sum(table.c.end - table.c.first - table.c.completed - table.c.failed), 0)
        rows = await self._db.read(select(left).where(table.c.done.is_(False), table.c.batch_id.in_(running)))
        return int(rows[0][0])

    async def claim(
        self, holder: str, lease_seconds: float, batch_id: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> ShardLease | None:
        """Take the lease of one free shard: of batch `batch_id` (its own job), or of the oldest running
        batch not in `exclude` whose shards are shareable (a helper); None if there is none."""
        table = self._table
        query = select(table.c.batch_id, table.c.shard).where(self._free())
        if batch_id is not None:
            query = query.where(table.c.batch_id == batch_id)
        else:
            query = query.where(table.c.shareable.is_(True))
            if exclude:
                query = query.where(table.c.batch_id.not_in(exclude))
        candidates = await self._db.read(query.order_by(table.c.batch_created_ns, table.c.shard).limit(8))
        for candidate in candidates:
            if lease := await self._take(candidate.batch_id, candidate.shard, holder, lease_seconds):
                return lease
        return None  # every candidate was taken by another process meanwhile: the next look finds others

    async def _take(self, batch_id: str, shard: int, holder: str, lease_seconds: float) -> ShardLease | None:
        table = self._table
        token = uuid.uuid4().hex
        take = (
            update(table)
            .where(table.c.batch_id == batch_id, table.c.shard == shard, self._free())
            .values(
                lease_token=token,
                lease_holder=holder,
                lease_epoch=table.c.lease_epoch + 1,
                lease_expires_at=self._db.now() + lease_seconds,
            )
            .returning(table.c.first, table.c.end, table.c.lease_epoch)
        )
        taken = (await self._db.write(take)).rows
        if not taken:
            return None
        row = taken[0]
        return ShardLease(batch_id, shard, row.first, row.end, token, row.lease_epoch)

    def _held_by(self, lease: ShardLease) -> ColumnElement[bool]:
        table = self._table
        return and_(
            table.c.batch_id == lease.batch_id, table.c.shard == lease.shard, table.c.lease_token == lease.token
        )

    async def renew(self, lease: ShardLease, lease_seconds: float) -> str | None:
        """Extend a shard's lease; return its batch's status, or None if the lease is not held any more."""
        table, batches = self._table, self._db.batches
        extend = (
            update(table)
            .where(self._held_by(lease))
            .values(lease_expires_at=self._db.now() + lease_seconds)
            .returning(table.c.shard)
        )
        if not (await self._db.write(extend)).rows:
            return None
        status = await self._db.read(select(batches.c.status).where(batches.c.id == lease.batch_id))
        # A batch closed meanwhile (expired or failed by its job) has nothing left for the shard to do.
        return status[0].status if status and status[0].status in UNFINISHED_STATUSES else None

    async def release(self, lease: ShardLease, done: bool = False) -> None:
        """Give a shard's lease up; `done` marks every one of its requests as having a stored result."""
        give_up = update(self._table).where(self._held_by(lease)).values(lease_token=None, lease_expires_at=None)
        await self._db.write(give_up.values(done=True) if done else give_up)

    async def revoke(self, batch_id: str) -> None:
        """Take every lease of a batch's shards back, held or run out: their holders can store, renew or
        release nothing more (the batch is being closed)."""
        revoke = update(self._table).where(self._table.c.batch_id == batch_id, self._table.c.lease_token.is_not(None))
        await self._db.write(revoke.values(lease_token=None, lease_expires_at=None))

    async def save_progress(self, lease: ShardLease, tally: Tally) -> bool:
        """Record the tally of a shard's stored results; False if the lease is not held any more."""
        values = {
            "completed": tally.completed,
            "failed": tally.failed,
            "input_tokens": tally.input_tokens,
            "output_tokens": tally.output_tokens,
        }
        return (await self._db.write(update(self._table).where(self._held_by(lease)).values(**values))).rowcount == 1

    async def progress(self, batch_ids: list[str]) -> dict[str, Tally]:
        """The sums of the shards' tallies, per batch that has shards."""
        if not batch_ids:
            return {}
        table = self._table
        sums = select(
            table.c.batch_id,
            func.sum(table.c.completed).label("completed"),
            func.sum(table.c.failed).label("failed"),
            func.sum(table.c.input_tokens).label("input_tokens"),
            func.sum(table.c.output_tokens).label("output_tokens"),
        ).where(table.c.batch_id.in_(batch_ids))
        rows = await self._db.read(sums.group_by(table.c.batch_id))
        return {
            row.batch_id: Tally(int(row.completed), int(row.failed), int(row.input_tokens), int(row.output_tokens))
            for row in rows
        }

    async def state(self, batch_id: str) -> ShardsState:
        table = self._table
        live = and_(table.c.lease_expires_at.is_not(None), table.c.lease_expires_at >= self._db.now())
        rows = await self._db.read(select(table.c.done, live.label("held")).where(table.c.batch_id == batch_id))
        return ShardsState(open=sum(1 for row in rows if not row.done), held=sum(1 for row in rows if row.held))

    async def delete(self, batch_id: str) -> None:
        """Drop a finished batch's shards, and their token estimates."""
        await self._db.write_if(
            self._table.delete().where(self._table.c.batch_id == batch_id), self.tokens.delete(batch_id)
        )
