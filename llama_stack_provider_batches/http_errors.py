"""The API's errors as OpenAI writes them, `{"error": {"message", "type", "param", "code"}}`, so that a
client reads `e.code` and `e.param` as it does against OpenAI.

The stack answers an exception raised by a provider with its own handler, whose error object holds
a message and nothing else. FastAPI sends a response a route returns as it is, though; so the object
the stack routes `/v1/batches` to (BatchesAPI) turns the errors the service raises into responses
itself. The service keeps raising: Python callers get exceptions with `param` and `code` attributes.

Client errors that a retry cannot fix carry `x-should-retry: false`, which the OpenAI SDK obeys;
without it the SDK retries a 409 twice (three POSTs for one create). A 429 stays retryable.

What the stack refuses before the provider runs (a `completion_window` other than `24h`, metadata of
the wrong type: FastAPI's validation of the request body) never reaches this module and keeps the
stack's shape.
"""

from dataclasses import dataclass
from typing import Any

from llama_stack.core.access_control.access_control import AccessDeniedError
from llama_stack_api import (
    BatchNotFoundError,
    BatchObject,
    CancelBatchRequest,
    ConflictError,
    CreateBatchRequest,
    ListBatchesRequest,
    ListBatchesResponse,
    RetrieveBatchRequest,
)
from starlette.responses import JSONResponse

from .service import BatchesService
from .user_limits import LimitReachedError
from .validation import InvalidParameterError

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
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class BatchesAPI:
    """What the stack routes `/v1/batches` to: the service, with its errors answered in OpenAI's shape."""

    def __init__(self, service: BatchesService) -> None:
        self.service = service

    async def create_batch(
        self, request: CreateBatchRequest | None = None, **fields: Any
    ) -> BatchObject | JSONResponse:
        try:
            return await self.service.create_batch(request, **fields)
        except Exception as exc:
            return answer(exc)

    async def retrieve_batch(self, request: RetrieveBatchRequest | str) -> BatchObject | JSONResponse:
        try:
            return await self.service.retrieve_batch(request)
        except Exception as exc:
            return answer(exc)

    async def cancel_batch(self, request: CancelBatchRequest | str) -> BatchObject | JSONResponse:
        try:
            return await self.service.cancel_batch(request)
        except Exception as exc:
            return answer(exc)

    async def list_batches(
        self, request: ListBatchesRequest | None = None, **fields: Any
    ) -> ListBatchesResponse | JSONResponse:
        try:
            return await self.service.list_batches(request, **fields)
        except Exception as exc:
            return answer(exc)

    async def shutdown(self) -> None:
        await self.service.shutdown()
