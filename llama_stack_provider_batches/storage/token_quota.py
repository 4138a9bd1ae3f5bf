"""Enqueued input tokens per user and model (`max_enqueued_tokens_per_user`), counted from the shard
rows, so that the count holds across restarts, workers and replicas.

A batch's estimate is written with its shards, per shard and model (the shard_tokens table). A
user's enqueued tokens on a model are what the shards of their validating and running batches have
left: each shard's estimate in proportion to its requests without a stored result (the tally its
runs save as they go). So tokens are released as requests finish, and all at once when the batch
leaves in_progress (finalizing, cancelling, any end). There is no counter to decrement, so a crash
cannot leave one wrong.

Admission writes the batch's shards, then reads its owner's counts, in one transaction kept only
if no model of the batch passes its limit. Its first write takes SQLite's write lock or, on
PostgreSQL, an advisory lock on the owner's scope: two batches of one user validated at once (on
two replicas, say) are counted one after the other, and cannot both pass.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Executable, Row, and_, func, select

from ..domain.errors import quoted
from .database import Database

COUNTED_STATUSES = ("validating", "in_progress")  # a batch's tokens are enqueued while it may still send


@dataclass(frozen=True)
class OverTokenLimit:
    """Why a batch was refused: on `model`, its `tokens` and the `enqueued` ones pass `limit`."""

    model: str
    limit: int
    enqueued: int  # in the user's other unfinished batches
    tokens: int  # this batch's estimate

    def message(self) -> str:
        head = f"Enqueued token limit reached for {quoted(self.model)}. Limit: {self.limit:,} enqueued tokens per user;"
        if self.tokens > self.limit:  # waiting does not help: it never fits
            return (
                f"{head} this batch alone holds an estimated {self.tokens:,} input tokens. Please split it into"
                f" batches of at most {self.limit:,} tokens."
            )
        return (
            f"{head} this batch holds an estimated {self.tokens:,} input tokens and your unfinished batches"
            f" {self.enqueued:,}. Please try submitting fewer requests, or try again once some of your"
            " in-progress batches have completed."
        )


def first_over(
    enqueued: Mapping[str, int], tokens: Mapping[str, int], limit_of: Callable[[str], int | None]
) -> OverTokenLimit | None:
    """The first model of a batch (`tokens`, by model) whose count with it (`enqueued`) passes its limit."""
    for model, own in tokens.items():
        limit = limit_of(model)
        total = enqueued.get(model, 0)
        if limit is not None and total > limit:
            return OverTokenLimit(model, limit, total - own, own)
    return None


class TokenQuota:
    """The shard_tokens rows: written with a batch's shards, summed per user and model."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._table = database.shard_tokens

    def _enqueued_query(self, scope: str | None) -> Executable:
        tokens, shards, batches = self._table, self._db.shards, self._db.batches
        size = shards.c.end - shards.c.first
        waiting = size - shards.c.completed - shards.c.failed
        left: ColumnElement[int] = (tokens.c.tokens * waiting + size - 1) // size  # rounded up
        counted = and_(batches.c.status.in_(COUNTED_STATUSES), shards.c.done.is_(False), size > 0)
        if scope is not None:
            counted = and_(counted, batches.c.scope == scope)
        joined = tokens.join(
            shards, and_(shards.c.batch_id == tokens.c.batch_id, shards.c.shard == tokens.c.shard)
        ).join(batches, batches.c.id == tokens.c.batch_id)
        return select(tokens.c.model, func.sum(left)).select_from(joined).where(counted).group_by(tokens.c.model)

    @staticmethod
    def _by_model(rows: list[Row[tuple[str, int]]]) -> dict[str, int]:
        return {model: int(total or 0) for model, total in rows}

    async def enqueued(self, scope: str | None = None) -> dict[str, int]:
        """Tokens enqueued by model: one owner scope's, or everybody's."""
        return self._by_model(await self._db.read(self._enqueued_query(scope)))

    async def write_within(
        self,
        scope: str,
        shards_insert: Executable,
        batch_id: str,
        tokens_per_shard: list[dict[str, int]],
        limit_of: Callable[[str], int | None],
    ) -> OverTokenLimit | None:
        """Write a batch's shards (`shards_insert`) and their tokens if every model stays within its limit
        for the owner `scope`; otherwise write nothing and say which model passes."""
        rows = [
            {"batch_id": batch_id, "shard": shard, "model": model, "tokens": tokens}
            for shard, by_model in enumerate(tokens_per_shard)
            for model, tokens in by_model.items()
        ]
        totals: dict[str, int] = {}
        for by_model in tokens_per_shard:
            for model, tokens in by_model.items():
                totals[model] = totals.get(model, 0) + tokens
        lock = self._db.advisory_lock(f"tokens/{scope}")
        writes = (*([lock] if lock is not None else []), shards_insert)
        if rows:
            writes = (*writes, self._db.insert(self._table).values(rows).on_conflict_do_nothing())

        def within(counts: list[Row[tuple[str, int]]]) -> bool:
            return first_over(self._by_model(counts), totals, limit_of) is None

        counts = await self._db.write_checked(writes, self._enqueued_query(scope), within)
        return first_over(self._by_model(counts), totals, limit_of)

    def delete(self, batch_id: str) -> Executable:
        """The statement that drops a batch's rows (with its shards)."""
        return self._table.delete().where(self._table.c.batch_id == batch_id)
