"""The Batches API surface: create, retrieve, cancel and list, as the stack and Python callers call them.

The stack calls each method with its request model. Python callers (such as tests written against
the upstream provider) may pass the same fields as keyword arguments, the idempotency key also
under its older name `idem_tok`, and a plain batch id to retrieve and cancel.
"""

import asyncio
import time
import uuid
from collections.abc import Callable

from llama_stack.core.access_control.access_control import AccessDeniedError
from llama_stack.core.access_control.datatypes import AccessRule, Action
from llama_stack.core.request_headers import get_authenticated_user
from llama_stack.log import get_logger
from llama_stack_api import (
    Batches,
    BatchNotFoundError,
    BatchObject,
    CancelBatchRequest,
    ConflictError,
    CreateBatchRequest,
    ListBatchesRequest,
    ListBatchesResponse,
    RetrieveBatchRequest,
)
from openai.types.batch_request_counts import BatchRequestCounts

from . import idempotency
from .config import BatchesProviderConfig
from .engine import BatchRunner
from .idempotency import CreateParams
from .lifecycle import is_terminal, transition
from .ownership import BatchResource, Owner, RouteGuard, carries_request_credentials, current_owner, may, scope_of
from .store import BatchStore, StoredBatch
from .validation import InvalidParameterError, validate_create_params, validate_list_limit

logger = get_logger(name=__name__, category="providers")


def new_batch_id() -> str:
    """A batch id in OpenAI's shape."""
    return f"batch_{uuid.uuid4().hex}"


class BatchesService(Batches):
    """The provider object the stack routes `/v1/batches` to."""

    def __init__(
        self,
        config: BatchesProviderConfig,
        store: BatchStore,
        runner: BatchRunner,
        policy: list[AccessRule] | None = None,
        routes: RouteGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._policy = policy or []
        self._routes = routes or RouteGuard([])
        self._store = store
        self._runner = runner
        self._clock = clock
        self._resuming: asyncio.Task[None] | None = None

    async def initialize(self) -> None:
        """Check the stored layout; background work starts later, on the serving loop (startup.py)."""
        await self._store.check_layout()

    def start(self) -> None:
        """Resume the unfinished batches of an earlier run; the first call does it, later ones nothing."""
        if self._resuming is None:
            self._resuming = asyncio.create_task(self._runner.resume(), name="batches:resume")

    async def shutdown(self) -> None:
        """Stop background work, leaving every batch in a status it can resume from."""
        if self._resuming is not None:
            # Let a resume that is reading the store finish; one waiting to retry is cancelled.
            await asyncio.wait({self._resuming}, timeout=1)
            self._resuming.cancel()
        await self._runner.shutdown()

    # --- create ---------------------------------------------------------------------------------

    async def create_batch(
        self,
        request: CreateBatchRequest | None = None,
        *,
        input_file_id: str | None = None,
        endpoint: str | None = None,
        completion_window: str | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        idem_tok: str | None = None,
    ) -> BatchObject:
        """Create a batch, or return the one an earlier call with the same idempotency key created."""
        self.start()
        if request is not None:
            input_file_id, endpoint = request.input_file_id, request.endpoint
            completion_window, metadata = request.completion_window, request.metadata
            idempotency_key = request.idempotency_key
        key = idempotency_key if idempotency_key is not None else idem_tok
        validate_create_params(input_file_id, endpoint, completion_window, metadata)
        if not self._routes.allows(endpoint):  # type: ignore[arg-type]  # validated just above
            raise AccessDeniedError("create", BatchResource(f"for {endpoint}", None), get_authenticated_user())
        params = CreateParams(
            input_file_id=input_file_id,  # type: ignore[arg-type]  # checked just above
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=completion_window,  # type: ignore[arg-type]
            metadata=None if metadata is None else dict(metadata),
        )
        owner = current_owner()
        scope = scope_of(owner)
        if key is None:
            batch = await self._store_new_batch(new_batch_id(), params, owner, key=None)
        else:
            async with self._store.idempotency_guard(scope, key):
                existing_id = await self._store.batch_id_for_key(scope, key)
                existing = await self._store.get(existing_id) if existing_id else None
                if existing is not None:
                    if not idempotency.same_request(existing.batch, params):
                        raise idempotency.conflict(key, existing.batch, params)
                    return existing.batch
                # The key is written before the batch, so a crash in between leaves a key whose
                # batch is missing; a retry then creates the batch under the id the key names.
                batch_id = existing_id or new_batch_id()
                if existing_id is None:
                    await self._store.remember_key(scope, key, batch_id)
                batch = await self._store_new_batch(batch_id, params, owner, key)
        self._runner.submit(batch.id)
        return batch

    async def _store_new_batch(
        self, batch_id: str, params: CreateParams, owner: Owner | None, key: str | None
    ) -> BatchObject:
        now = int(self._clock())
        batch = BatchObject(
            id=batch_id,
            object="batch",
            endpoint=params.endpoint,
            input_file_id=params.input_file_id,
            completion_window=params.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + self._config.completion_window_seconds,
            metadata=None if params.metadata is None else dict(params.metadata),
            request_counts=BatchRequestCounts(total=0, completed=0, failed=0),
        )
        scope = scope_of(owner)
        position = await self._store.append_to_index(scope, batch_id)
        await self._store.add_active(batch_id)
        stored = StoredBatch(
            batch=batch,
            owner=owner,
            request_credentials=carries_request_credentials(),
            idempotency_key=key,
            index_position=position,
        )
        await self._store.put(stored)
        logger.info("Created batch", batch_id=batch_id, idempotent=key is not None)
        return batch

    # --- retrieve and cancel --------------------------------------------------------------------

    async def retrieve_batch(self, request: RetrieveBatchRequest | str) -> BatchObject:
        """The batch with this id; BatchNotFoundError (HTTP 404) if there is none."""
        self.start()
        batch_id = request if isinstance(request, str) else request.batch_id
        return (await self._visible(batch_id, Action.READ)).batch

    async def _visible(self, batch_id: str, action: Action) -> StoredBatch:
        """The stored batch if the caller may do `action` on it; otherwise as if it did not exist."""
        stored = await self._store.get(batch_id)
        if stored is None or not may(self._policy, action, batch_id, stored.owner):
            raise BatchNotFoundError(batch_id)
        return stored

    async def cancel_batch(self, request: CancelBatchRequest | str) -> BatchObject:
        """Ask a batch to stop. Finished batches refuse (HTTP 409); cancelling ones are returned as they are."""
        self.start()
        batch_id = request if isinstance(request, str) else request.batch_id

        def to_cancelling(stored: StoredBatch) -> StoredBatch:
            batch = stored.batch
            if not may(self._policy, Action.UPDATE, batch_id, stored.owner):
                raise BatchNotFoundError(batch_id)  # as if it did not exist, like _visible
            if batch.status in ("cancelling", "cancelled"):
                return stored
            if is_terminal(batch.status):
                raise ConflictError(f"Cannot cancel a batch with status '{batch.status}'.")
            return stored.model_copy(update={"batch": transition(batch, "cancelling", int(self._clock()))})

        # The access check runs inside the update, on the record it changes: one read, no race.
        stored = await self._store.update_record(batch_id, to_cancelling)
        self._runner.request_cancel(batch_id)
        return stored.batch

    # --- list -----------------------------------------------------------------------------------

    async def list_batches(
        self, request: ListBatchesRequest | None = None, *, after: str | None = None, limit: int = 20
    ) -> ListBatchesResponse:
        """A page of batches, newest first, starting after the batch id `after`."""
        self.start()
        if request is not None:
            after, limit = request.after, request.limit
        limit = validate_list_limit(limit)
        scope = scope_of(current_owner())
        before = None
        if after is not None:
            cursor = await self._store.get(after)
            if cursor is None or scope_of(cursor.owner) != scope or cursor.index_position is None:
                raise InvalidParameterError("after", f"No batch with id {after!r} to list after.", "invalid_request")
            before = cursor.index_position
        ids = await self._store.newest_ids(scope, before, limit + 1)
        readable = [
            s for s in await self._store.get_many(ids[:limit]) if may(self._policy, Action.READ, s.batch.id, s.owner)
        ]
        page = [stored.batch for stored in readable]
        return ListBatchesResponse(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(ids) > limit,
        )
