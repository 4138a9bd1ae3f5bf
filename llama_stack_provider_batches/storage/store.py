"""What the provider stores, and the small interface its storage connector (sql_store.py) implements.

Finished request results are kept in chunks (ResultChunks below): they are the bulk of the data,
written by one job at a time, and need no more than point reads and writes by key.

Leases. A server runs a batch only while it holds the batch's lease, which it takes with `claim`
and keeps with `renew` while working. Each claim of a batch starts a new lease epoch; a job writes
its results under its epoch, and its batch updates carry its lease, so that a job whose lease was
taken over by another replica can neither overwrite results nor change the batch
(`LeaseLostError`). How a connector makes claims exclusive is written where it does it.
"""

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..domain.records import StoredBatch
from ..domain.results import ResultEntry, encode_results
from ..stack import BatchNotFoundError, BatchObject
from .shards import ShardStore

IDS_PER_CHUNK = 5_000


class Chunks(Protocol):
    """Point reads and writes of text by key, and keys by prefix: the chunks table (database.py)."""

    async def get(self, key: str) -> str | None: ...

    async def get_many(self, keys: list[str]) -> dict[str, str]: ...

    async def set(self, key: str, value: str) -> None: ...

    async def set_while_held(self, key: str, value: str, batch_id: str, shard: int, token: str) -> bool: ...

    async def keys_under(self, prefix: str) -> list[str]: ...

    async def keys_between(self, low: str, high: str) -> list[str]: ...

    async def delete_under(self, prefix: str) -> None: ...


@dataclass(frozen=True)
class Lease:
    """The right to run one batch, held by one server until it releases it or stops renewing it."""

    batch_id: str
    token: str  # unique to this claim
    epoch: int  # how many times the batch has been claimed; results are written under it


@dataclass(frozen=True)
class BatchPage:
    """One page of a list: batches newest first, and whether older ones follow."""

    batches: list[StoredBatch]
    has_more: bool


class LeaseLostError(Exception):
    """The batch's lease was taken over: another server runs it now, this one must stop."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"The lease on batch {batch_id!r} is held by another server now.")
        self.batch_id = batch_id


READ_PAGE = 64  # result chunks per query: a chunk holds a group commit's results (tens of KB at most)


class ResultChunks:
    """Finished request results of unfinished batches, kept in chunks:

        results/<batch_id>/s<shard>/e<epoch>/<n>   chunk n of a shard, written under its lease epoch
        results/<batch_id>/<n>                     chunk n of an earlier release's single server (epoch 0)
        results/<batch_id>/e<epoch>/<n>            chunk n of an earlier release's replica (batch lease epoch)

    A shard job numbers its chunks from the count its epoch already has, so no count is kept in step
    with them. A job that lost its lease can still write late, but only into its own epoch: nothing
    is overwritten. A request found twice ran twice; readers keep the result read first, and read
    the chunks of earlier releases first, then each shard's epochs in order.
    """

    def __init__(self, chunks: Chunks) -> None:
        self._chunks = chunks

    async def save(
        self, batch_id: str, shard: int, epoch: int, chunk: int, entries: list[ResultEntry], token: str | None = None
    ) -> None:
        """Store results as chunk number `chunk` of a shard's epoch; with the `token` of a shard lease,
        only while that lease holds the shard (LeaseLostError otherwise): a run that lost its shard,
        or whose batch ended and was cleaned up meanwhile, must not leave results behind."""
        key, value = f"results/{batch_id}/s{shard}/e{epoch}/{chunk}", encode_results(entries)
        if token is None:
            await self._chunks.set(key, value)
        elif not await self._chunks.set_while_held(key, value, batch_id, shard, token):
            raise LeaseLostError(batch_id)

    async def count(self, batch_id: str, shard: int, epoch: int) -> int:
        """How many chunks a shard's epoch has stored (a job retried under the same lease numbers on)."""
        return len(await self._chunks.keys_under(f"results/{batch_id}/s{shard}/e{epoch}/"))

    async def read(self, batch_id: str, shard: int | None = None) -> AsyncIterator[str]:
        """Yield the stored chunks of a batch, oldest first, one at a time: those of earlier releases,
        then every shard's, or only shard `shard`'s. They are read READ_PAGE at a time: one query per
        chunk made a batch's finalization a round trip per group commit (350 ms for 600 requests)."""
        under = f"results/{batch_id}/"
        if shard is None:
            keys = await self._chunks.keys_under(under)
        else:  # the shard's own, and an earlier release's (whose keys sort below "s": digits and "e")
            keys = await self._chunks.keys_between(under, under + "s") + await self._chunks.keys_under(
                f"{under}s{shard}/"
            )
        keys.sort(key=_chunk_order)
        for start in range(0, len(keys), READ_PAGE):
            page = keys[start : start + READ_PAGE]
            texts = await self._chunks.get_many(page)
            for key in page:
                if (text := texts.get(key)) is not None:
                    yield text

    async def delete(self, batch_id: str) -> None:
        """Drop a finished batch's chunks (its files now hold them)."""
        await self._chunks.delete_under(f"results/{batch_id}/")


def _chunk_order(key: str) -> tuple[int, int, int, int]:
    """(0 for an earlier release's chunk else 1, shard or -1, epoch, n) of a result chunk's key."""
    parts = key.split("/")[2:]
    number = int(parts[-1])
    if parts[0].startswith("s"):
        return (1, int(parts[0][1:]), int(parts[1][1:]), number)
    return (0, -1, int(parts[0][1:]) if len(parts) == 2 else 0, number)


class RequestIds:
    """The custom_ids of a running batch's requests, in file order, kept in chunks:

        ids/<batch_id>/<n>    JSON list of up to IDS_PER_CHUNK custom_ids

    Written once, when the batch passes validation, so that every request can be given its line
    in the result files even when the input file cannot be read any more (it was deleted, the batch
    expired on resume): no request goes unaccounted for.
    """

    def __init__(self, chunks: Chunks) -> None:
        self._kv = chunks

    def _key(self, batch_id: str, chunk: int) -> str:
        return f"ids/{batch_id}/{chunk}"

    async def save(self, batch_id: str, custom_ids: list[str]) -> None:
        for chunk, start in enumerate(range(0, len(custom_ids), IDS_PER_CHUNK)):
            await self._kv.set(self._key(batch_id, chunk), json.dumps(custom_ids[start : start + IDS_PER_CHUNK]))

    async def load(self, batch_id: str) -> list[str]:
        """The stored custom_ids; shorter than the batch (empty for a batch of an older release) if not all were."""
        custom_ids: list[str] = []
        chunk = 0
        while (text := await self._kv.get(self._key(batch_id, chunk))) is not None:
            custom_ids.extend(json.loads(text))
            chunk += 1
        return custom_ids

    async def delete(self, batch_id: str) -> None:
        await self._kv.delete_under(f"ids/{batch_id}/")


if TYPE_CHECKING:
    from .retention import RetentionStore


class BatchStore(ABC):
    """Batch records, idempotency keys, the list order and the leases: one connector's job."""

    results: ResultChunks
    request_ids: RequestIds
    shards: ShardStore
    retention: "RetentionStore"

    @abstractmethod
    async def initialize(self) -> None:
        """Prepare the storage (check or create its layout); called once, before anything else."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; called when the server stops."""

    @abstractmethod
    async def get(self, batch_id: str) -> StoredBatch | None:
        """The stored batch, or None if there is none with this id."""

    async def get_batch(self, batch_id: str) -> BatchObject:
        """The batch object; BatchNotFoundError if there is none."""
        stored = await self.get(batch_id)
        if stored is None:
            raise BatchNotFoundError(batch_id)
        return stored.batch

    @abstractmethod
    async def create(
        self, stored: StoredBatch, claim_for: str | None = None, lease_seconds: float = 0.0
    ) -> tuple[StoredBatch, Lease | None]:
        """Store a new batch and queue it for running; return it, and its lease if `claim_for` is given.

        With `claim_for`, the batch is stored already claimed by that server, so no other can run
        it first. If its idempotency key already names a batch in its owner's scope, store nothing
        and return that batch (and no lease) instead: of any number of concurrent creates with one
        key, one wins.
        """

    @abstractmethod
    async def update_record(
        self, batch_id: str, change: Callable[[StoredBatch], StoredBatch], lease: Lease | None = None
    ) -> StoredBatch:
        """Apply `change` to the stored record atomically with respect to other updates; return the result.

        `change` may raise (for example IllegalTransitionError); then nothing is written. With a
        `lease`, the update is made only while that lease holds (LeaseLostError otherwise).
        """

    async def update(
        self, batch_id: str, change: Callable[[BatchObject], BatchObject], lease: Lease | None = None
    ) -> BatchObject:
        """Apply `change` to the stored batch object, as `update_record` does; return the new batch."""
        stored = await self.update_record(batch_id, lambda s: s.model_copy(update={"batch": change(s.batch)}), lease)
        return stored.batch

    @abstractmethod
    async def page(self, scope: str, after: str | None, limit: int) -> BatchPage | None:
        """Up to `limit` batches of a scope, newest first, older than batch `after` if given.

        None if `after` names no batch of this scope.
        """

    @abstractmethod
    async def find_by_key(self, scope: str, key: str) -> StoredBatch | None:
        """The batch created in `scope` with idempotency key `key`, if there is one."""

    @abstractmethod
    async def active_work(self, scope: str) -> tuple[int, int]:
        """(unfinished batches, requests not yet run in them) of an owner's scope. A validating batch's
        requests are its `request_lines` (0 if they were not counted), a running one's its shards' rest."""

    @abstractmethod
    async def claim(self, holder: str, count: int, lease_seconds: float, newcomers_only: bool = False) -> list[Lease]:
        """Take the leases of up to `count` unfinished batches nobody holds, fairly: the owners running
        the fewest batches first, taking turns, each owner's oldest first. With `newcomers_only`, only
        batches of owners none of whose batches `holder` holds."""

    @abstractmethod
    async def claim_batch(self, batch_id: str, holder: str, lease_seconds: float) -> Lease | None:
        """Take the lease of one unfinished batch if nobody holds it (to close it without a slot)."""

    @abstractmethod
    async def unfinished_by_status(self) -> dict[str, int]:
        """How many unfinished batches each unfinished status holds, across every process."""

    @abstractmethod
    async def waiting_ids(self, count: int) -> list[str]:
        """The ids of up to `count` unfinished batches nobody holds, oldest first; nothing is claimed."""

    @abstractmethod
    async def renew(self, lease: Lease, lease_seconds: float) -> str | None:
        """Extend a lease; return the batch's status, or None if the lease is not held any more."""

    @abstractmethod
    async def release(self, lease: Lease) -> None:
        """Give a lease up, so that any server may claim the batch again at once."""
