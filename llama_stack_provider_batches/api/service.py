"""The Batches API surface: create, retrieve, cancel and list, as the stack and Python callers call them.

The stack calls each method with its request model. Python callers (such as tests written against
the upstream provider) may pass the same fields as keyword arguments, the idempotency key also
under its older name `idem_tok`, and a plain batch id to retrieve and cancel.

Every parameter is checked (validation.py) before anything reaches the store: a batch id that
cannot be one of ours answers 404 without a store read, so no caller text of any size or content
is looked up, written or echoed.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from openai.types.batch_request_counts import BatchRequestCounts

from .. import telemetry
from ..config import BatchesProviderConfig
from ..domain.errors import InvalidParameterError, shown
from ..domain.lifecycle import BatchNotCancellableError, is_terminal, transition
from ..domain.ownership import (
    BatchResource,
    Owner,
    RouteGuard,
    carries_request_credentials,
    check_may_create,
    current_owner,
    may,
    scope_of,
)
from ..domain.records import StoredBatch, is_batch_id
from ..engine.runner import BatchRunner
from ..requests.stack_apis import StackAPIs, unavailable_message
from ..requests.token_estimates import load_encodings
from ..stack import (
    AccessDeniedError,
    AccessRule,
    Action,
    Batches,
    BatchNotFoundError,
    BatchObject,
    CancelBatchRequest,
    CreateBatchRequest,
    ListBatchesRequest,
    ListBatchesResponse,
    RetrieveBatchRequest,
    RetrieveFileRequest,
    get_authenticated_user,
    get_logger,
)
from ..storage.store import BatchStore
from . import idempotency
from .http_errors import body_field
from .idempotency import CreateParams
from .user_limits import UserLimits
from .validation import (
    SUPPORTED_ENDPOINTS,
    validate_create_params,
    validate_idempotency_key,
    validate_input_file_purpose,
    validate_list_after,
    validate_list_limit,
    validate_output_expires_after,
)
from .webhook_endpoints import WebhookEndpoints

logger = get_logger(name=__name__, category="providers")


def new_batch_id() -> str:
    """A batch id in OpenAI's shape."""
    return f"batch_{uuid.uuid4().hex}"


def not_found(batch_id: Any) -> BatchNotFoundError:
    """The 404 for an id that cannot name a batch; the store is not asked, the message shows the id shortened."""
    return BatchNotFoundError(shown(batch_id))


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
        files: Any | None = None,
        apis: StackAPIs | None = None,
    ) -> None:
        """`files` is the stack's Files API, used to check the input file's purpose at create (skipped without
        it); `apis` tells which endpoints the stack can serve (all, without it)."""
        self._config = config
        self._files = files
        self._apis = apis
        self._policy = policy or []
        self._routes = routes or RouteGuard([])
        self._store = store
        self._runner = runner
        self._clock = clock
        self._config = config
        self._limits = UserLimits(config, store, files)
        self.webhooks: WebhookEndpoints | None = None  # /v1/webhook_endpoints (webhook_endpoints.py)
        self.webhook_client: Any = None  # the HTTP client that sends test events
        # What a refused endpoint's message lists: OpenAI's batch endpoints that this stack has the APIs for.
        self._served_endpoints = tuple(e for e in SUPPORTED_ENDPOINTS if apis is None or apis.serves(e))

    async def initialize(self) -> None:
        """Prepare the store, and the tokenizers of a token quota; background work starts later, on the
        serving loop (startup.py)."""
        await self._store.initialize()
        if self._config.max_enqueued_tokens_per_user is not None:
            await asyncio.to_thread(load_encodings, set(self._config.token_encodings.values()))

    def start(self) -> None:
        """Start claiming and running batches (those of an earlier run first); later calls do nothing."""
        self._runner.start()

    async def shutdown(self) -> None:
        """Stop background work, leaving every batch in a status it can resume from."""
        await self._runner.shutdown()
        await self._store.close()

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
        output_expires_after: dict[str, Any] | None = None,
    ) -> BatchObject:
        """Create a batch, or return the one an earlier call with the same idempotency key created."""
        self.start()
        if request is not None:
            input_file_id, endpoint = request.input_file_id, request.endpoint
            completion_window, metadata = request.completion_window, request.metadata
            idempotency_key = request.idempotency_key
        key = idempotency_key if idempotency_key is not None else idem_tok
        validate_create_params(input_file_id, endpoint, completion_window, metadata, self._served_endpoints)
        if self._apis is not None and not self._apis.serves(endpoint):  # type: ignore[arg-type]  # validated
            raise InvalidParameterError("endpoint", unavailable_message(endpoint))  # type: ignore[arg-type]
        validate_idempotency_key(key)
        # Not in the stack's request model (it drops unknown fields): read from the request's body.
        expires_after = validate_output_expires_after(
            output_expires_after if output_expires_after is not None else body_field("output_expires_after"),
            self._config.min_output_expires_after_seconds,
        )
        if not self._routes.allows(endpoint):  # type: ignore[arg-type]  # validated just above
            raise AccessDeniedError("create", BatchResource(f"for {endpoint}", None), get_authenticated_user())
        params = CreateParams(
            input_file_id=input_file_id,  # type: ignore[arg-type]  # checked just above
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=completion_window,  # type: ignore[arg-type]
            metadata=None if metadata is None else dict(metadata),
        )
        owner = current_owner()
        candidate = self._new_batch(params, owner, key)
        candidate.output_expires_after_seconds = expires_after
        check_may_create(self._policy, candidate.batch.id)  # the access policy's `create`, before anything is stored
        await self._check_input_file_purpose(params.input_file_id)
        # Credentials that came with this request are not stored: such a batch waits here, and only so many may.
        claim_for = self._runner.holder if candidate.request_credentials else None
        async with self._limits.admit(scope_of(owner), params.input_file_id, key) as request_lines:
            candidate.request_lines = request_lines
            with self._runner.room_to_park() if claim_for else contextlib.nullcontext():
                stored, lease = await self._store.create(candidate, claim_for, self._runner.lease_seconds)
                if lease is not None:
                    self._runner.adopt(lease, stored.batch)
        if key is not None and not idempotency.same_request(stored.batch, params):  # the key's earlier batch
            raise idempotency.conflict(key, stored.batch, params)
        if stored.batch.id == candidate.batch.id:
            logger.info("Created batch", batch_id=stored.batch.id, idempotent=key is not None)
            telemetry.batch_created(stored.batch.endpoint)
        self._runner.wake()
        return stored.batch

    async def _check_input_file_purpose(self, input_file_id: str) -> None:
        """Refuse (HTTP 400) an input file uploaded for another purpose than 'batch', as OpenAI does.

        The lookup runs in the creating request's context, with the caller's rights. A file that
        cannot be looked up is not refused here: validation then fails the batch with the
        missing-file error, as for a file deleted after create.
        """
        if self._files is None:
            return
        try:
            info = await self._files.openai_retrieve_file(RetrieveFileRequest(file_id=input_file_id))
        except Exception:  # missing, not the caller's, or the lookup failed: left to validation
            return
        validate_input_file_purpose(input_file_id, getattr(info, "purpose", "batch"))

    def _new_batch(self, params: CreateParams, owner: Owner | None, key: str | None) -> StoredBatch:
        now = int(self._clock())
        batch = BatchObject(
            id=new_batch_id(),
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
        return StoredBatch(
            batch=batch, owner=owner, request_credentials=carries_request_credentials(), idempotency_key=key
        )

    # --- retrieve and cancel --------------------------------------------------------------------

    async def retrieve_batch(self, request: RetrieveBatchRequest | str) -> BatchObject:
        """The batch with this id; BatchNotFoundError (HTTP 404) if there is none."""
        self.start()
        batch_id = request if isinstance(request, str) else request.batch_id
        return (await self._visible(batch_id, Action.READ)).batch

    async def _visible(self, batch_id: str, action: Action) -> StoredBatch:
        """The stored batch if the caller may do `action` on it; otherwise as if it did not exist."""
        if not is_batch_id(batch_id):
            raise not_found(batch_id)
        stored = await self._store.get(batch_id)
        if stored is None or not may(self._policy, action, batch_id, stored.owner):
            raise BatchNotFoundError(batch_id)
        return stored

    async def cancel_batch(self, request: CancelBatchRequest | str) -> BatchObject:
        """Ask a batch to stop. Finished batches refuse (HTTP 409); cancelling ones are returned as they are."""
        self.start()
        batch_id = request if isinstance(request, str) else request.batch_id
        if not is_batch_id(batch_id):
            raise not_found(batch_id)

        def to_cancelling(stored: StoredBatch) -> StoredBatch:
            batch = stored.batch
            if not may(self._policy, Action.UPDATE, batch_id, stored.owner):
                raise BatchNotFoundError(batch_id)  # as if it did not exist, like _visible
            if batch.status in ("cancelling", "cancelled"):
                return stored
            if is_terminal(batch.status):
                raise BatchNotCancellableError(batch_id, batch.status)
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
        after = validate_list_after(after)
        found = await self._store.page(scope_of(current_owner()), after, limit)
        if found is None:
            raise InvalidParameterError("after", f"No batch with id {after!r} to list after.", "invalid_request")
        page = [s.batch for s in found.batches if may(self._policy, Action.READ, s.batch.id, s.owner)]
        return ListBatchesResponse(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=found.has_more,
        )
