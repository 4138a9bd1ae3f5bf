"""Per-user limits on waiting work: at most `max_active_batches_per_user` unfinished batches and
`max_queued_requests_per_user` requests not yet run, per user (owner scope).

Checked at create, before anything is stored; a create beyond a limit is refused with HTTP 429 and
a message naming the limit, so that no user can queue work without bound on a shared service. A
create repeating an idempotency key that already has its batch is never refused: it creates nothing.

Counting the new batch's requests means reading its input file at create, which is done only when
the request limit is set. Within a process, one user's creates are checked one at a time, so the
limits hold exactly; creates of one user racing on several processes at the same instant may each
pass the check (at most one batch over per process).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..config import BatchesProviderConfig
from ..domain.errors import LimitReachedError
from ..requests.input_reader import input_content
from ..stack import Files
from ..storage.store import BatchStore


def count_requests(content: bytes) -> int:
    """The requests a batch input file holds: its lines (split at "\n", as the parser does) that are not blank."""
    return sum(1 for line in content.split(b"\n") if line.strip())


class UserLimits:
    """Admits creates within the per-user limits of the config."""

    def __init__(self, config: BatchesProviderConfig, store: BatchStore, files: Files | None) -> None:
        self._max_batches = config.max_active_batches_per_user
        self._max_requests = config.max_queued_requests_per_user
        self._store = store
        self._files = files
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # scope -> (lock, creates using it)

    @contextlib.asynccontextmanager
    async def admit(self, scope: str, input_file_id: str, key: str | None) -> AsyncIterator[int | None]:
        """Hold a user's place while their batch is created; yield its request count if it was counted.
        Raise LimitReachedError if the batch would take the user beyond a limit."""
        if self._max_batches is None and self._max_requests is None:
            yield None
            return
        async with self._lock_of(scope):
            if key is not None and await self._store.find_by_key(scope, key) is not None:
                yield None  # a repeat: it returns the batch the key has
                return
            batches, queued = await self._store.active_work(scope)
            if self._max_batches is not None and batches >= self._max_batches:
                raise LimitReachedError(
                    f"You have {batches} unfinished batches, the most one user may have"
                    f" (max_active_batches_per_user: {self._max_batches}). Create this one once some have finished."
                )
            requests = None
            if self._max_requests is not None:
                requests = await self._requests_in(input_file_id)
                if queued + requests > self._max_requests:
                    raise LimitReachedError(
                        f"This batch's {requests} requests and the {queued} not yet run in your unfinished batches"
                        f" exceed the requests one user may have queued (max_queued_requests_per_user:"
                        f" {self._max_requests}). Create it once some have run."
                    )
            yield requests

    @contextlib.asynccontextmanager
    async def _lock_of(self, scope: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(scope, (asyncio.Lock(), 0))
        self._locks[scope] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[scope]
            if users == 1:
                del self._locks[scope]
            else:
                self._locks[scope] = (lock, users - 1)

    async def _requests_in(self, input_file_id: str) -> int:
        """The requests in the input file; 0 if it cannot be read (validation then refuses the batch)."""
        if self._files is None:
            return 0
        try:
            content = await input_content(self._files, input_file_id)
        except Exception:
            return 0
        return 0 if content is None else await asyncio.to_thread(count_requests, content)
