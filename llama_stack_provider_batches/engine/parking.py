"""Leases a process holds with no job running (runner.py): batches created here with per-request
credentials, waiting for their turn in the context of the request that created them, and batches
set aside because they could not even be marked failed.

Credentials are never stored, so such a batch can only run where it was created: it is created
already leased to this process and parks here, at most `max_waiting_batches_with_credentials` of
them (beyond that, create answers HTTP 429). Parked leases are renewed together, a few times per
lease length; a renewal that finds a batch cancelled through another process reports it, to be closed.
"""

import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from ..domain.errors import LimitReachedError
from ..domain.outages import log_failure
from ..stack import BatchObject, get_logger
from ..storage.store import BatchStore, Lease

logger = get_logger(name=__name__, category="providers")


class TooManyWaitingBatchesError(LimitReachedError):
    """Too many batches with per-request credentials wait on this server (HTTP 429)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} batches created with per-request credentials already wait on this server; "
            "retry once some have finished."
        )


@dataclass
class ParkedLease:
    """A lease held here with no job running."""

    lease: Lease  # replaced if it ran out and this server claimed the batch again
    created_at: int
    context: contextvars.Context | None  # the creating request's; None: set aside, never to run here
    expires_at: int | None = None


class ParkedLeases:
    """The parked leases of one process, by batch id."""

    def __init__(self, store: BatchStore, lease_seconds: float, max_waiting: int) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._max_waiting = max_waiting
        self._parked: dict[str, ParkedLease] = {}
        self._renewed_at = time.monotonic()
        self._arriving = 0  # creates of batches with credentials under way

    def __contains__(self, batch_id: str) -> bool:
        return batch_id in self._parked

    def get(self, batch_id: str) -> ParkedLease | None:
        return self._parked.get(batch_id)

    def pop(self, batch_id: str) -> ParkedLease | None:
        return self._parked.pop(batch_id, None)

    def put_back(self, parked: ParkedLease) -> None:
        self._parked[parked.lease.batch_id] = parked

    def waiting(self) -> list[ParkedLease]:
        """The batches waiting to run here, in their creating requests' contexts."""
        return [parked for parked in self._parked.values() if parked.context is not None]

    @contextlib.contextmanager
    def room(self) -> Iterator[None]:
        """Hold a place for a batch with per-request credentials while it is created; refuse (HTTP 429)
        when too many already wait here. Taken before the first await, so concurrent creates count."""
        if len(self.waiting()) + self._arriving >= self._max_waiting:
            raise TooManyWaitingBatchesError(self._max_waiting)
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def wait_here(self, lease: Lease, batch: BatchObject, context: contextvars.Context) -> None:
        self._parked[lease.batch_id] = ParkedLease(lease, batch.created_at, context, batch.expires_at)

    def set_aside(self, lease: Lease) -> None:
        """Hold a lease without ever running its batch here, until the server stops."""
        self._parked[lease.batch_id] = ParkedLease(lease, 0, None)

    def past_deadline(self, now: float) -> list[str]:
        return [
            parked.lease.batch_id
            for parked in self.waiting()
            if parked.expires_at is not None and parked.expires_at <= now
        ]

    async def renew(self) -> set[str]:
        """Keep the parked leases, a few times per lease length; return the waiting batches that were
        cancelled through another server meanwhile."""
        cancelled: set[str] = set()
        if not self._parked or time.monotonic() - self._renewed_at < self._lease_seconds / 3:
            return cancelled
        self._renewed_at = time.monotonic()
        for batch_id, parked in list(self._parked.items()):
            try:
                status = await self._store.renew(parked.lease, self._lease_seconds)
            except Exception as exc:  # one unreadable record must not stop the claim loop
                log_failure(logger, "Cannot renew a parked batch's lease", exc, batch_id=batch_id)
                continue
            if status is None:
                logger.warning("A parked batch's lease was lost", batch_id=batch_id)
                self._parked.pop(batch_id, None)
            elif status == "cancelling" and parked.context is not None:
                cancelled.add(batch_id)
        return cancelled

    async def release_all(self, release: Callable[[Lease], Awaitable[None]]) -> None:
        for parked in list(self._parked.values()):
            await release(parked.lease)
        self._parked.clear()
