"""The API's errors as OpenAI writes them, `{"error": {"message", "type", "param", "code"}}`, so that a
client reads `e.code` and `e.param` as it does against OpenAI.

The stack answers an exception raised by a provider with its own handler, whose error object holds
a message and nothing else. FastAPI sends a response a route returns as it is, though. So the HTTP
routes of `/v1/batches` call the service through BatchesAPI, which turns the errors it raises into
responses: `use_openai_error_routes` has the stack build its batches routes (the stack's own
`create_router`, unchanged) over BatchesAPI rather than over the service. The provider object the
stack holds is still the service, which raises: Python callers (the stack's library client, a
test) get exceptions with `param` and `code` attributes.

Client errors that a retry cannot fix carry `x-should-retry: false`, which the OpenAI SDK obeys;
without it the SDK retries a 409 twice (three POSTs for one create). A 429 stays retryable.

What the stack refuses before the provider runs (a `completion_window` other than `24h`, metadata of
the wrong type: FastAPI's validation of the request body) never reaches this module and keeps the
stack's shape.
"""

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from llama_stack.core.access_control.access_control import AccessDeniedError
from llama_stack.log import get_logger
from llama_stack_api import (
    Api,
    BatchNotFoundError,
    BatchObject,
    CancelBatchRequest,
    ConflictError,
    CreateBatchRequest,
    ListBatchesRequest,
    ListBatchesResponse,
    RetrieveBatchRequest,
)
from llama_stack_api.batches.fastapi_routes import create_router
from starlette.responses import JSONResponse

from .service import BatchesService
from .user_limits import LimitReachedError
from .validation import InvalidParameterError

logger = get_logger(name=__name__, category="providers")

NO_RETRY = {"x-should-retry": "false"}


@dataclass(frozen=True)
class OpenAIError:
    """An error answer: its HTTP status and OpenAI's error object."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return NO_RETRY if self.status != 429 else {}


def openai_error(exc: Exception) -> OpenAIError | None:
    """The answer to an error the service raised; None for one the stack's handler should answer (a 5xx)."""
    if isinstance(exc, InvalidParameterError):
        return OpenAIError(400, exc.message, "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, LimitReachedError):  # before ConflictError, of which it is a kind
        return OpenAIError(429, str(exc), "requests", None, exc.code)
    if isinstance(exc, BatchNotFoundError):
        return OpenAIError(404, str(exc), "invalid_request_error")
    if isinstance(exc, ConflictError):
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        return OpenAIError(409, str(exc), "invalid_request_error", param, code)
    if isinstance(exc, AccessDeniedError):
        return OpenAIError(403, str(exc), "invalid_request_error")
    return None


def answer(exc: Exception) -> JSONResponse:
    """`exc` as the response FastAPI sends; re-raises what the stack's handler should answer."""
    error = openai_error(exc)
    if error is None:
        raise exc
    # One line, not the traceback the stack's handler prints: the client sent something to refuse.
    logger.info("Refused a batches request", status=error.status, code=error.code, message=error.message[:200])
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def answered[T](call: Awaitable[T]) -> T | JSONResponse:
    """What `call` returns, or the response to the error it raised."""
    try:
        return await call
    except Exception as exc:
        return answer(exc)


class BatchesAPI:
    """What the HTTP routes of `/v1/batches` call: the service, with its errors answered in OpenAI's shape."""

    def __init__(self, service: BatchesService) -> None:
        self.service = service

    async def create_batch(
        self, request: CreateBatchRequest | None = None, **fields: Any
    ) -> BatchObject | JSONResponse:
        return await answered(self.service.create_batch(request, **fields))

    async def retrieve_batch(self, request: RetrieveBatchRequest | str) -> BatchObject | JSONResponse:
        return await answered(self.service.retrieve_batch(request))

    async def cancel_batch(self, request: CancelBatchRequest | str) -> BatchObject | JSONResponse:
        return await answered(self.service.cancel_batch(request))

    async def list_batches(
        self, request: ListBatchesRequest | None = None, **fields: Any
    ) -> ListBatchesResponse | JSONResponse:
        return await answered(self.service.list_batches(request, **fields))


def routes_answering_openai_errors(impl: BatchesService) -> APIRouter:
    """The stack's own `/v1/batches` routes, calling `impl` through BatchesAPI."""
    return create_router(BatchesAPI(impl))  # type: ignore[arg-type]  # the routes call only its four methods


def use_openai_error_routes() -> bool:
    """Have the stack build its `/v1/batches` routes with routes_answering_openai_errors; whether it could.

    The stack looks its route factories up in a registry when it builds the app, after the
    providers are built: replacing the entry for batches here changes nothing else. A stack without
    that registry keeps its own routes, and errors keep its shape (a message only).
    """
    try:
        from llama_stack.core.server import fastapi_router_registry
    except ImportError:
        return False
    factories = getattr(fastapi_router_registry, "_ROUTER_FACTORIES", None)
    current = factories.get(Api.batches.value) if isinstance(factories, dict) else None
    if current is routes_answering_openai_errors:  # a second provider built in this process
        return True
    if current is not create_router:
        logger.warning("The stack's batches routes are not the expected ones; errors keep the stack's shape")
        return False
    factories[Api.batches.value] = routes_answering_openai_errors  # type: ignore[index]
    return True
