"""The stack this provider runs in, llama-stack 0.7 or OGX 1.x, and every name it takes from that stack.

OGX is llama-stack renamed (`llama_stack` is `ogx`, `llama_stack_api` is `ogx_api`): its APIs, request
models and storage are the same but for the package prefix. Every other module imports stack names
from here, never from `llama_stack*` or `ogx*`, so that one package runs on both. What differs beyond
the names is below the imports, each difference in one function.

Which stack: the one that has loaded its own modules before it loaded this provider; otherwise
(tests, tools) the one installed, llama-stack first. No version is compared anywhere.

Its sibling `stack_routing.py` is the rest of the seam: views of the stack's inference router that
reach into its objects (not its names) to skip per-request costs a batch need not pay.
"""

import contextlib
import contextvars
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

StackName = Literal["llama-stack", "ogx"]


def _detect() -> StackName:
    if "ogx" in sys.modules:
        return "ogx"
    if "llama_stack" in sys.modules or importlib.util.find_spec("llama_stack") is not None:
        return "llama-stack"
    return "ogx"


STACK: StackName = _detect()

if STACK == "llama-stack":
    from llama_stack.core.access_control.access_control import AccessDeniedError, is_action_allowed
    from llama_stack.core.access_control.datatypes import AccessRule, Action, RouteAccessRule, Scope
    from llama_stack.core.datatypes import User
    from llama_stack.core.request_headers import (
        PROVIDER_DATA_VAR,
        RequestProviderDataContext,
        get_authenticated_user,
    )
    from llama_stack.core.server import fastapi_router_registry
    from llama_stack.core.server.auth import RouteAuthorizationMiddleware as _RouteMiddleware
    from llama_stack.core.stack import replace_env_vars
    from llama_stack.core.storage.datatypes import (
        KVStoreReference,
        PostgresKVStoreConfig,
        PostgresSqlStoreConfig,
        RedisKVStoreConfig,
        SqlAlchemySqlStoreConfig,
        SqliteKVStoreConfig,
        SqliteSqlStoreConfig,
        SqlStoreReference,
    )
    from llama_stack.core.storage.kvstore import kvstore_impl, register_kvstore_backends
    from llama_stack.core.storage.sqlstore import sqlstore as _sqlstore
    from llama_stack.core.storage.sqlstore.sqlstore import register_sqlstore_backends
    from llama_stack.log import get_logger
    from llama_stack_api import (
        Api,
        Batches,
        BatchNotFoundError,
        BatchObject,
        CancelBatchRequest,
        ConflictError,
        CreateBatchRequest,
        CreateResponseRequest,
        DeleteFileRequest,
        ExpiresAfter,
        Files,
        GetModelRequest,
        Inference,
        InlineProviderSpec,
        ListBatchesRequest,
        ListBatchesResponse,
        ListFilesRequest,
        ModelNotFoundError,
        Models,
        OpenAIChatCompletion,
        OpenAIChatCompletionRequestWithExtraBody,
        OpenAICompletionRequestWithExtraBody,
        OpenAIEmbeddingsRequestWithExtraBody,
        OpenAIFilePurpose,
        Order,
        Responses,
        RetrieveBatchRequest,
        RetrieveFileContentRequest,
        RetrieveFileRequest,
        RunModerationRequest,
        Safety,
        Shields,
        UploadFileRequest,
    )
    from llama_stack_api.batches.fastapi_routes import create_router
    from llama_stack_api.common.errors import ResourceNotFoundError, ResponseNotFoundError
    from llama_stack_api.internal.kvstore import KVStore

    OpenAIFileUploadPurpose = OpenAIFilePurpose  # one enum for uploads and listings in llama-stack
else:
    from ogx.core.access_control.access_control import AccessDeniedError, is_action_allowed
    from ogx.core.access_control.datatypes import AccessRule, Action, RouteAccessRule, Scope
    from ogx.core.access_control.route_access import is_route_allowed as _is_route_allowed
    from ogx.core.datatypes import User
    from ogx.core.request_headers import PROVIDER_DATA_VAR, RequestProviderDataContext, get_authenticated_user
    from ogx.core.server import fastapi_router_registry
    from ogx.core.stack import replace_env_vars
    from ogx.core.storage.datatypes import (
        KVStoreReference,
        PostgresKVStoreConfig,
        PostgresSqlStoreConfig,
        RedisKVStoreConfig,
        SqlAlchemySqlStoreConfig,
        SqliteKVStoreConfig,
        SqliteSqlStoreConfig,
        SqlStoreReference,
    )
    from ogx.core.storage.kvstore import kvstore_impl, register_kvstore_backends
    from ogx.core.storage.sqlstore import sqlstore as _sqlstore
    from ogx.core.storage.sqlstore.sqlstore import register_sqlstore_backends
    from ogx.log import get_logger
    from ogx_api import (
        Api,
        Batches,
        BatchNotFoundError,
        BatchObject,
        CancelBatchRequest,
        ConflictError,
        CreateBatchRequest,
        CreateResponseRequest,
        DeleteFileRequest,
        ExpiresAfter,
        Files,
        GetModelRequest,
        Inference,
        InlineProviderSpec,
        ListBatchesRequest,
        ListBatchesResponse,
        ListFilesRequest,
        ModelNotFoundError,
        Models,
        OpenAIChatCompletion,
        OpenAIChatCompletionRequestWithExtraBody,
        OpenAICompletionRequestWithExtraBody,
        OpenAIEmbeddingsRequestWithExtraBody,
        OpenAIFilePurpose,
        OpenAIFileUploadPurpose,
        Order,
        Responses,
        RetrieveBatchRequest,
        RetrieveFileContentRequest,
        RetrieveFileRequest,
        UploadFileRequest,
    )
    from ogx_api.batches.fastapi_routes import create_router
    from ogx_api.common.errors import ResourceNotFoundError, ResponseNotFoundError
    from ogx_api.internal.kvstore import KVStore

    # OGX has no Safety API (moderations): the provider never gets one, and `/v1/moderations` is refused
    # as on a llama-stack without `safety` in its run.yaml. These stand for the absent types.
    class Safety:
        """The Safety API, which OGX does not have."""

    class Shields:
        """The Shields API, which OGX does not have."""

    RunModerationRequest: Any = None

__all__ = [
    "PROVIDER_DATA_VAR",
    "STACK",
    "AccessDeniedError",
    "AccessRule",
    "Action",
    "Api",
    "BatchNotFoundError",
    "BatchObject",
    "Batches",
    "CancelBatchRequest",
    "ConflictError",
    "CreateBatchRequest",
    "CreateResponseRequest",
    "DeleteFileRequest",
    "ExpiresAfter",
    "Files",
    "GetModelRequest",
    "Inference",
    "InlineProviderSpec",
    "KVStore",
    "KVStoreReference",
    "ListBatchesRequest",
    "ListBatchesResponse",
    "ListFilesRequest",
    "ModelNotFoundError",
    "Models",
    "OpenAIChatCompletion",
    "OpenAIChatCompletionRequestWithExtraBody",
    "OpenAICompletionRequestWithExtraBody",
    "OpenAIEmbeddingsRequestWithExtraBody",
    "OpenAIFilePurpose",
    "OpenAIFileUploadPurpose",
    "Order",
    "PostgresKVStoreConfig",
    "PostgresSqlStoreConfig",
    "RedisKVStoreConfig",
    "RequestProviderDataContext",
    "ResourceNotFoundError",
    "ResponseNotFoundError",
    "Responses",
    "RetrieveBatchRequest",
    "RetrieveFileContentRequest",
    "RetrieveFileRequest",
    "RouteAccessRule",
    "RunModerationRequest",
    "Safety",
    "Scope",
    "Shields",
    "SqlAlchemySqlStoreConfig",
    "SqlStoreReference",
    "SqliteKVStoreConfig",
    "SqliteSqlStoreConfig",
    "UploadFileRequest",
    "User",
    "create_router",
    "fastapi_router_registry",
    "get_authenticated_user",
    "get_logger",
    "is_action_allowed",
    "kvstore_impl",
    "register_kvstore_backends",
    "register_sqlstore_backends",
    "replace_env_vars",
]


# --- what differs beyond the names ---------------------------------------------------------------


def optional_apis() -> list[Any]:
    """The APIs the provider uses where the stack has them: Responses, and Safety with its shields."""
    names = ("responses", "safety", "shields")
    return [Api(name) for name in names if name in Api.__members__]


def sql_engine_url(reference: SqlStoreReference) -> Any:
    """The SQLAlchemy URL (a string, or a `sqlalchemy.URL` on OGX) of the backend `reference` names.

    The provider runs its own engine on it (database.py). llama-stack builds the backend object
    synchronously; OGX builds it only asynchronously, so its registered configuration is read.
    """
    if STACK == "llama-stack":
        config = getattr(_sqlstore.sqlstore_impl(reference), "config", None)
    else:
        config = _sqlstore._SQLSTORE_BACKENDS.get(reference.backend)
    if not isinstance(config, SqlAlchemySqlStoreConfig):
        raise ValueError(f"The batches sql_store backend {reference.backend!r} is not a SQLite or PostgreSQL one.")
    return config.engine_str


def user(principal: str, attributes: dict[str, list[str]] | None, tenant_id: str | None = None) -> User:
    """A stack user; OGX's have a tenant (llama-stack's have none, and `tenant_id` is then None)."""
    if STACK == "ogx":
        return User(principal, attributes, tenant_id=tenant_id)
    return User(principal, attributes)


def tenant_of(stack_user: Any) -> str | None:
    return getattr(stack_user, "tenant_id", None)


async def response_bytes(response: Any) -> bytes:
    """The body of a Files API content response, whether whole (`body`) or streamed (`body_iterator`,
    as OGX's S3 files provider answers)."""
    iterator = getattr(response, "body_iterator", None)
    if iterator is None:
        return bytes(response.body)
    parts = []
    async for part in iterator:
        parts.append(part if isinstance(part, bytes) else str(part).encode())
    return b"".join(parts)


def route_allowed(route: str, stack_user: Any, route_policy: list[RouteAccessRule]) -> bool:
    """Whether the stack's route policy lets `stack_user` use `route`. OGX has a function for it;
    llama-stack judges it in its route middleware only."""
    if not route_policy:
        return True
    if STACK == "ogx":
        return _is_route_allowed(route, stack_user, route_policy)
    middleware = _RouteMiddleware(app=None, route_policy=route_policy)  # type: ignore[arg-type]
    return middleware._is_route_allowed(route, stack_user)


# The environment variable naming the run config the server was started with.
CONFIG_VARIABLE = "OGX_CONFIG" if STACK == "ogx" else "LLAMA_STACK_CONFIG"


# llama-stack builds providers in a temporary event loop, closed before serving starts; OGX builds them
# on the serving loop (startup.py starts background work accordingly).
PROVIDERS_BUILT_ON_SERVING_LOOP = STACK == "ogx"
# OGX shuts providers down in the order it built them: a provider's dependencies before it.
DEPENDENCIES_SHUT_DOWN_FIRST = STACK == "ogx"


def _providers_by_id(router: Any) -> dict[str, Any]:
    table = getattr(router, "routing_table", None)
    return getattr(table, "impls_by_provider_id", None) or {}


def inference_providers(router: Any) -> list[Any]:
    """The inference router and the providers it routes to (each holds a client to its backend)."""
    return [router, *_providers_by_id(router).values()]


@dataclass(frozen=True)
class ModelBackend:
    """The model server behind one remote inference provider (an OpenAI-compatible one: vLLM, Ollama...)."""

    provider_id: str
    base_url: str
    # Asks the server for its model ids (GET {base_url}/models) as the stack does at start-up; raises
    # what the provider's client raises when the server does not answer or refuses.
    list_model_ids: Callable[[], Awaitable[Iterable[str]]]


def model_backend(router: Any, provider_id: str) -> ModelBackend | None:
    """The model server of the inference provider run.yaml names `provider_id`; None when there is no
    such provider or it is not a remote one that lists its models (both stacks' OpenAI-compatible
    providers have `get_base_url` and `list_provider_model_ids`)."""
    provider = _providers_by_id(router).get(provider_id)
    get_base_url = getattr(provider, "get_base_url", None)
    list_model_ids = getattr(provider, "list_provider_model_ids", None)
    if not callable(get_base_url) or not callable(list_model_ids):
        return None
    try:
        base_url = str(get_base_url())
    except Exception:  # a provider whose URL comes from each request's provider data, say
        return None
    return ModelBackend(provider_id, base_url, list_model_ids)


def reconnect_postgres_kvstores() -> bool:
    """Make llama-stack's PostgreSQL kvstore connect again when its connection is gone.

    llama-stack 0.7's kvstore holds one psycopg2 connection for its life: once the server restarts,
    every call raises ("cursor already closed") until the stack restarts, and the model registry
    kept there fails every request. Each call of the store's class now connects again and runs once
    more when it meets a closed connection; while the server is down it raises the driver's error,
    which outages.py counts as an outage. OGX's kvstore has a pool that reconnects by itself: nothing
    is changed there. Returns whether the store's class was changed.
    """
    if STACK != "llama-stack":
        return False
    try:
        import psycopg2
        from llama_stack.core.storage.kvstore.postgres.postgres import PostgresKVStoreImpl
    except ImportError:
        return False
    methods = ("get", "set", "delete", "values_in_range", "keys_in_range")
    if not all(callable(getattr(PostgresKVStoreImpl, name, None)) for name in methods) or not hasattr(
        PostgresKVStoreImpl, "initialize"
    ):
        get_logger(name=__name__, category="providers").warning(
            "llama-stack's PostgreSQL kvstore is not as expected; it will not reconnect after a database restart"
        )
        return False
    store_log = logging.getLogger(PostgresKVStoreImpl.__module__)
    if not any(isinstance(f, _QuietWhileReconnecting) for f in store_log.filters):
        store_log.addFilter(_QuietWhileReconnecting())
    for name in methods:
        method = getattr(PostgresKVStoreImpl, name)
        if not getattr(method, "_reconnects", False):
            setattr(
                PostgresKVStoreImpl, name, _reconnecting(method, (psycopg2.InterfaceError, psycopg2.OperationalError))
            )
    return True


RECONNECT_SECONDS = 1.0  # between two attempts of one store to connect while its server is down
# The store connects synchronously, on the serving loop: without a bound, a server whose packets are
# dropped (a partition, not a refusal) would hold every request for the kernel's TCP timeout (~2 min).
RECONNECT_TIMEOUT_SECONDS = 3
_reconnecting_now: contextvars.ContextVar[bool] = contextvars.ContextVar("batches_reconnecting", default=False)


class _QuietWhileReconnecting(logging.Filter):
    """Drops the kvstore's own records while it reconnects: it logs a failed connect with a rendered
    traceback, which held the serving loop for seconds per attempt; the failure itself is raised to
    the caller, and outages.py logs the outage once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _reconnecting_now.get()


def _reconnecting(method: Callable[..., Awaitable[Any]], lost: tuple[type[BaseException], ...]) -> Any:
    async def call(store: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(store, *args, **kwargs)
        except lost:
            # At most one attempt a second: each failed one blocks the loop to connect, and the stack
            # logs it with a rendered traceback; every model lookup would try otherwise.
            if time.monotonic() < getattr(store, "_batches_reconnect_after", 0.0):
                raise
            connection = getattr(store, "_conn", None)
            if connection is not None:
                with contextlib.suppress(Exception):  # closing a connection that is gone may fail too
                    connection.close()
            store._batches_reconnect_after = time.monotonic() + RECONNECT_SECONDS
            quiet = _reconnecting_now.set(True)
            try:
                with _libpq_connect_timeout(RECONNECT_TIMEOUT_SECONDS):
                    await store.initialize()  # raises, with the driver's error as its cause, while the server is down
            finally:
                _reconnecting_now.reset(quiet)
            return await method(store, *args, **kwargs)

    call._reconnects = True  # type: ignore[attr-defined]
    call.__name__ = call.__qualname__ = getattr(method, "__name__", "call")
    return call


@contextlib.contextmanager
def _libpq_connect_timeout(seconds: int) -> Iterator[None]:
    """libpq's connect timeout for the connects made inside, unless the operator set PGCONNECT_TIMEOUT.

    The store's `initialize` passes no timeout and awaits nothing before its connect returns, so the
    variable is set only for that synchronous stretch of the loop."""
    if "PGCONNECT_TIMEOUT" in os.environ:
        yield
        return
    os.environ["PGCONNECT_TIMEOUT"] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop("PGCONNECT_TIMEOUT", None)


async def set_file_expiry(files: Any, file_id: str, expires_at: int) -> bool:
    """Set a stored file's `expires_at` where the Files provider ignored the `expires_after` it was
    given (llama-stack's and OGX's localfs keep `created_at + ttl_secs`): its metadata row, through
    the provider's own SQL store, under the caller's rights. Whether it could."""
    sql_store = getattr(files, "sql_store", None)
    update = getattr(sql_store, "update", None)
    if update is None:
        return False
    try:
        await update("openai_files", {"expires_at": expires_at}, where={"id": file_id})
    except Exception:
        return False
    return True
