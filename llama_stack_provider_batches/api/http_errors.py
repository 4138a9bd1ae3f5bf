"""The API's errors as OpenAI writes them, `{"error": {"message", "type", "param", "code"}}`, so that a
client reads `e.code` and `e.param` as it does against OpenAI.

The stack answers an exception from a route with its own handler, whose error object holds a
message and nothing else. So the `/v1/batches` routes the stack serves are its own routes (its
`create_router`, unchanged) of a route class that answers errors itself: `use_openai_error_routes`
has the stack build them so. This covers the provider's errors and the stack's validation of the
request body (a `completion_window` other than `24h`, metadata of the wrong type), which FastAPI
raises inside the same route handler. The provider object stays as it is and raises: Python
callers, the stack's library client included (it calls the routes' functions, not their HTTP
handlers), get exceptions with `param` and `code` attributes.

Client errors that a retry cannot fix carry `x-should-retry: false`, which the OpenAI SDK obeys;
without it the SDK retries a 409 twice (three POSTs for one create). A 429 stays retryable, and so
does the 503 (`service_unavailable`, with `Retry-After`) of a request that met an outage of the
database or the files (domain/outages.py).
"""

import contextvars
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..domain.errors import InvalidParameterError, LimitReachedError, WebhookEndpointNotFoundError, shown
from ..domain.outages import is_dependency_outage
from ..stack import (
    AccessDeniedError,
    Api,
    BatchNotFoundError,
    ConflictError,
    create_router,
    fastapi_router_registry,
    get_logger,
)
from .validation import invalid_type

logger = get_logger(name=__name__, category="providers")

NO_RETRY = {"x-should-retry": "false"}
OUTAGE_MESSAGE = "The batch service's storage is not answering at the moment; please try again shortly."
OUTAGE_RETRY_AFTER_SECONDS = 1


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
        if self.status == 503:
            return {"retry-after": str(OUTAGE_RETRY_AFTER_SECONDS)}
        return NO_RETRY if self.status != 429 else {}


def openai_error(exc: Exception) -> OpenAIError | None:
    """The answer to an error a route raised; None for one the stack's handler should answer (a 5xx)."""
    if isinstance(exc, RequestValidationError):
        return request_body_error(exc)
    if isinstance(exc, InvalidParameterError):
        return OpenAIError(400, exc.message, "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, LimitReachedError):  # before ConflictError, of which it is a kind
        return OpenAIError(429, str(exc), "requests", None, exc.code)
    if isinstance(exc, BatchNotFoundError | WebhookEndpointNotFoundError):
        return OpenAIError(404, str(exc), "invalid_request_error")
    if isinstance(exc, ConflictError):
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        return OpenAIError(409, str(exc), "invalid_request_error", param, code)
    if isinstance(exc, AccessDeniedError):
        return OpenAIError(403, str(exc), "invalid_request_error")
    if is_dependency_outage(exc):  # the batch store or the files did not answer: worth trying again
        return OpenAIError(503, OUTAGE_MESSAGE, "server_error", None, "service_unavailable")
    return None


def answer(exc: Exception) -> JSONResponse:
    """`exc` as the response FastAPI sends; re-raises what the stack's handler should answer."""
    error = openai_error(exc)
    if error is None:
        raise exc
    # One line, not the traceback the stack's handler prints: the client sent something to refuse, or
    # a dependency is out (rendering a traceback per request would stall the serving loop meanwhile).
    detail = error.message[:200] if error.status != 503 else f"{type(exc).__name__}: {exc}"[:200]
    logger.info("Refused a batches request", status=error.status, code=error.code, message=detail)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


# Pydantic's errors for a value of the wrong JSON type, with the type the field expected.
EXPECTED_TYPES = {
    "string_type": "a string",
    "dict_type": "an object",
    "list_type": "an array",
    "int_type": "an integer",
    "float_type": "a decimal",
    "bool_type": "a boolean",
}


def param_path(location: Sequence[Any]) -> str | None:
    """A pydantic error location as OpenAI names a parameter: `metadata.tags`, `data[0].id`; caller text shortened."""
    if location and location[0] in ("body", "query", "path"):  # where FastAPI found it, not part of the name
        location = location[1:]
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{shown(part)}" if path else shown(part)
    return path or None


def request_body_error(exc: RequestValidationError) -> OpenAIError:
    """The stack's validation of a request, as OpenAI answers a bad parameter: its first problem, named."""
    problem = exc.errors()[0] if exc.errors() else {}
    if problem.get("type") == "json_invalid":  # OpenAI's words
        return OpenAIError(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    param = param_path(problem.get("loc", ()))
    if problem.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
        return OpenAIError(400, message, "invalid_request_error", param, "missing_required_parameter")
    expected = EXPECTED_TYPES.get(problem.get("type", ""))
    if expected is not None and param is not None:  # the same answer as the provider's own check (validation.py)
        refusal = invalid_type(param, expected, problem.get("input"))
        return OpenAIError(400, refusal.message, "invalid_request_error", refusal.param, refusal.code)
    message = f"Invalid value for '{param}': {problem.get('msg', 'not accepted')}."
    return OpenAIError(400, message, "invalid_request_error", param, "invalid_value")


# The JSON object a POST sent, whole: the stack's request models drop the fields they do not know
# (`output_expires_after` on create), which the provider reads from here (`body_field`).
_body_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "batches_body_fields", default=None
)


def body_field(name: str) -> Any:
    """A field of the JSON body of the request being answered (None if absent or not JSON)."""
    return (_body_fields.get() or {}).get(name)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()  # cached on the request: the stack's handler reads it again
    except Exception:  # not JSON: the stack's handler refuses it
        return {}
    return body if isinstance(body, dict) else {}


class OpenAIErrorRoute(APIRoute):
    """A route whose errors are answered in OpenAI's shape (`answer`) rather than by the stack's handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answering(request: Request) -> Response:
            fields = _body_fields.set(await _json_object(request) if request.method == "POST" else {})
            try:
                return await handler(request)
            except Exception as exc:
                return answer(exc)
            finally:
                _body_fields.reset(fields)

        return answering


def routes_answering_openai_errors(impl: Any) -> APIRouter:
    """The stack's own `/v1/batches` routes over `impl`, answering their errors in OpenAI's shape."""
    router = create_router(impl)
    for route in router.routes:
        if type(route) is APIRoute:
            route.__class__ = OpenAIErrorRoute  # the same route; only how its handler answers errors changes
    return router


def use_openai_error_routes(factory: Callable[[Any], APIRouter] = routes_answering_openai_errors) -> bool:
    """Have the stack build its `/v1/batches` routes with `factory` (routes_answering_openai_errors, or
    one that adds routes to them); whether it could.

    The stack looks its route factories up in a registry when it builds the app, after the
    providers are built: replacing the entry for batches here changes nothing else. A stack without
    that registry keeps its own routes, and errors keep its shape (a message only).
    """
    factories = getattr(fastapi_router_registry, "_ROUTER_FACTORIES", None)
    current = factories.get(Api.batches.value) if isinstance(factories, dict) else None
    if current is factory:  # a second provider built in this process
        return True
    if current is not create_router and not getattr(current, "answers_openai_errors", False):
        logger.warning("The stack's batches routes are not the expected ones; errors keep the stack's shape")
        return False
    factory.answers_openai_errors = True  # type: ignore[attr-defined]  # ours: it may be swapped for another
    factories[Api.batches.value] = factory  # type: ignore[index]
    return True
