"""Sending one batch request through the stack API serving its endpoint, and turning the outcome into a result line."""

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai
from pydantic import BaseModel, ValidationError

from .. import telemetry
from ..domain import formats
from ..domain.errors import status_code_of
from ..domain.outages import DependencyGate, is_dependency_outage
from ..stack import (
    CreateResponseRequest,
    OpenAIChatCompletionRequestWithExtraBody,
    OpenAICompletionRequestWithExtraBody,
    OpenAIEmbeddingsRequestWithExtraBody,
    Responses,
    RunModerationRequest,
    get_logger,
)
from .input_file import RequestLine
from .resilience import RateLimiter, RetryPolicy, is_backend_failure, is_transient, retry_after_seconds
from .routes import StackRoutes
from .stack_apis import EndpointUnavailableError, StackAPIs

logger = get_logger(name=__name__, category="providers")


async def call_endpoint(apis: StackAPIs, endpoint: str, body: dict[str, Any]) -> BaseModel:
    """Run one request body against `endpoint` through the stack API serving it; return the response model.

    A Responses request runs as a client's non-streaming request does (create_response): the body
    is refused at validation if it asks for streaming or background mode (input_file.py).
    """
    response: BaseModel
    if endpoint == "/v1/chat/completions":
        response = await apis.inference.openai_chat_completion(  # type: ignore[assignment]
            OpenAIChatCompletionRequestWithExtraBody.model_validate(body)
        )
    elif endpoint == "/v1/completions":
        response = await apis.inference.openai_completion(  # type: ignore[assignment]
            OpenAICompletionRequestWithExtraBody.model_validate(body)
        )
    elif endpoint == "/v1/embeddings":
        response = await apis.inference.openai_embeddings(OpenAIEmbeddingsRequestWithExtraBody.model_validate(body))
    elif endpoint == "/v1/responses":
        if apis.responses is None:
            raise EndpointUnavailableError(endpoint)
        response = await create_response(apis.responses, body)
    elif endpoint == "/v1/moderations":
        if apis.safety is None:
            raise EndpointUnavailableError(endpoint)
        response = await apis.safety.run_moderation(RunModerationRequest.model_validate(body))
    else:
        raise ValueError(f"Unsupported endpoint {endpoint!r}")
    return response


# Error codes of a failed Response (OpenAI's list, which the stack maps backend errors to) that a retry
# may cure, with the HTTP status a client would have seen; any other code is the request's own fault.
TRANSIENT_RESPONSE_ERRORS = {"server_error": 500, "rate_limit_exceeded": 429, "vector_store_timeout": 504}


class ResponseFailedError(Exception):
    """The stack's Responses API ended a response `failed`: `code` and `message` are its error's."""

    def __init__(self, code: str | None, message: str | None) -> None:
        self.code = code or "server_error"
        self.status_code = TRANSIENT_RESPONSE_ERRORS.get(self.code, 400)
        super().__init__(message or "The response failed without an error message.")


async def create_response(responses: Responses, body: dict[str, Any]) -> BaseModel:
    """The Response to `body`, as the stack answers a request without `stream`; ResponseFailedError if it failed.

    The stack's non-streaming path reads its own event stream to the end and, when the response
    fails, raises a bare HTTP 500 that drops the error's code: a backend's 429 and its 400 look alike.
    Reading the same stream here keeps the code, so that retries go to failures a retry may cure.
    The stack builds, stores and returns the same response either way (its telemetry records the
    request as streamed).
    """
    request = CreateResponseRequest.model_validate({**body, "stream": True})
    events: Any = await responses.create_openai_response(request)
    final: BaseModel | None = None
    # Closed on every way out (a failure, a timeout, a cancel), so the stack's generator ends at once.
    async with contextlib.aclosing(events) if hasattr(events, "aclose") else contextlib.nullcontext():
        async for event in events:
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
            elif event.type == "response.failed":
                error = event.response.error
                raise ResponseFailedError(getattr(error, "code", None), getattr(error, "message", None))
    if final is None:
        raise ResponseFailedError("server_error", "The response stream ended before the response did.")
    return final


RETRY_LOG_SECONDS = 10.0


class RetryLog:
    """Warns of retried requests at most once per RETRY_LOG_SECONDS for each model and cause, saying how
    many retries it did not show: a failing backend must be seen in the log, not flood it. Retries not
    shown before the backend recovers are counted in the next warning of that model and cause, if
    any (and always in the `retries_total` metric)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._shown_at: dict[tuple[str, str], float] = {}
        self._unshown: dict[tuple[str, str], int] = {}

    def retried(self, model: str, cause: str, exc: BaseException) -> None:
        key, now = (model, cause), self._clock()
        if now - self._shown_at.get(key, -RETRY_LOG_SECONDS) < RETRY_LOG_SECONDS:
            self._unshown[key] = self._unshown.get(key, 0) + 1
            return
        self._shown_at[key] = now
        unshown = self._unshown.pop(key, 0)
        error = connection_message(exc) if cause == "connection_error" else str(exc)
        logger.warning("Retrying batch requests", model=model, cause=cause, error=error[:300], not_shown=unshown)


class Outcomes(Protocol):
    """Who hears how each attempt went: the scheduler's slot (scheduler.py), which adapts its model's capacity."""

    def record_success(self) -> None: ...

    def record_transient_failure(self) -> None: ...


class DeadlineReached(Exception):
    """The batch's window closed before this request could be sent."""


@dataclass
class RequestSender:
    """Sends batch requests with retries, a timeout per attempt and a pace. How many are in flight is
    the scheduler's business (scheduler.py): a request is sent once it holds a slot.

    Requests go through the stack's APIs as `routes` (routes.py) hands them out: chat completions
    skip the completion store unless their body says `store: true`, and model lookups are reused
    for `lookup_seconds`.

    A request that fails because a dependency of the stack is out (outages.py) waits at the gate and
    goes again once it opens: that costs it no attempt and its model no capacity. Every request
    waits at the gate before it goes, so nothing new is sent while results cannot be stored.
    """

    apis: StackAPIs
    policy: RetryPolicy
    timeout_seconds: float
    pacer: RateLimiter | None = None
    gate: DependencyGate = field(default_factory=DependencyGate)
    lookup_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.routes = StackRoutes(self.apis, self.lookup_seconds)
        self._retry_log = RetryLog()

    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        outcomes: Outcomes,
        stopping: asyncio.Event,
        expired: Callable[[], bool] = lambda: False,
        model: str | None = None,
    ) -> BaseModel:
        """The response to `body`; raises the last failure once it is permanent or attempts run out.

        `model` names what the pace is kept for, and the request in metrics (by default the body's
        model). Raises DeadlineReached, without sending, when `expired()` holds by the time an attempt
        would go out: waits for the pace or a retry's pause may outlast the batch's window.
        """
        model = model or str(body.get("model"))
        with telemetry.span("batches.request", endpoint=endpoint, model=model):
            try:
                response = await self._with_retries(endpoint, body, outcomes, stopping, expired, model)
            except DeadlineReached:
                raise
            except Exception as exc:
                if not stopping.is_set():  # at a stop, it runs again after the restart
                    telemetry.request_ended(endpoint, model, telemetry.outcome_of(exc))
                raise
            telemetry.request_ended(endpoint, model, "succeeded")
            return response

    async def _with_retries(
        self,
        endpoint: str,
        body: dict[str, Any],
        outcomes: Outcomes,
        stopping: asyncio.Event,
        expired: Callable[[], bool],
        model: str,
    ) -> BaseModel:
        apis = self.routes.for_request(stored=body.get("store") is True)
        attempt = 0
        while True:
            await self.gate.wait_open()
            if self.pacer is not None:
                await self.pacer.wait(model)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    if expired():
                        raise DeadlineReached()
                    response = await call_endpoint(apis, endpoint, body)
            except DeadlineReached:
                raise
            except Exception as exc:
                if stopping.is_set():
                    raise
                if is_dependency_outage(exc):  # not the model's failure, nor the request's: send it again
                    telemetry.attempt_ended(endpoint, model, "dependency_outage", time.perf_counter() - started)
                    self.gate.trip(exc)
                    continue
                cause = telemetry.outcome_of(exc)
                telemetry.attempt_ended(endpoint, model, cause, time.perf_counter() - started)
                attempt += 1
                if not is_transient(exc) or attempt == self.policy.attempts:
                    raise
                if is_backend_failure(exc):  # a bug or hiccup inside the stack must not halve the model's window
                    outcomes.record_transient_failure()
                telemetry.retried(endpoint, model, cause)
                self._retry_log.retried(model, cause, exc)
                await asyncio.sleep(self.policy.delay(attempt - 1, retry_after_seconds(exc)))
            else:
                telemetry.attempt_ended(endpoint, model, "succeeded", time.perf_counter() - started)
                self.gate.recovered()
                outcomes.record_success()
                return response


def response_tokens(response: BaseModel) -> tuple[int, int]:
    """(input, output) tokens a response reports using; (0, 0) when it reports nothing readable."""
    try:
        usage = getattr(response, "usage", None)
        if isinstance(usage, BaseModel):
            usage = usage.model_dump()
    except Exception:  # an odd usage object must not cost the answer its result line
        return 0, 0
    return formats.token_usage({"usage": usage})


def result_for_response(custom_id: str, response: BaseModel) -> tuple[bool, str, int, int]:
    """(ok, result line, input tokens, output tokens) for a request the model answered. Never raises.

    A response that cannot be written as a result line (its model fails to serialize it, it holds
    invalid Unicode such as a lone surrogate, or its JSON exceeds formats.MAX_RESPONSE_BYTES) gets an
    error line instead: every request must end with a line, and one answer must not stall its batch.
    """
    try:
        try:
            # Every field, null ones included, as OpenAI writes them: client code reads
            # `choice["logprobs"]` or `message["tool_calls"]` and must not meet a KeyError.
            body_json = response.model_dump_json()
            size = formats.utf8_size(body_json)
        except Exception:
            message = "The model's response cannot be written as JSON: it is not serializable or not valid Unicode."
            return False, formats.failure_line(custom_id, "invalid_response", message), 0, 0
        if size > formats.MAX_RESPONSE_BYTES:
            message = f"The model's response is {size} bytes; a result line holds at most {formats.MAX_RESPONSE_BYTES}."
            return False, formats.failure_line(custom_id, "response_too_large", message), 0, 0
        return True, formats.success_line(custom_id, body_json), *response_tokens(response)
    except Exception:
        return False, _internal_error_line(custom_id), 0, 0


def connection_message(exc: BaseException) -> str:
    """A connection failure, naming the backend it could not reach when the client says which."""
    text = str(exc) or "The connection failed."
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    if url is None or not getattr(url, "host", None):
        return text
    port = f":{url.port}" if url.port else ""
    return f"{text} Cannot reach the model backend at {url.scheme}://{url.host}{port}{url.path}."


def _internal_error_line(custom_id: str) -> str:
    return formats.failure_line(custom_id, "internal_error", "The request's result could not be recorded.")


def _backend_error(exc: openai.APIStatusError) -> dict[str, Any]:
    """The OpenAI error object a backend sent, whether or not the client already unwrapped it."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body["error"] if isinstance(body.get("error"), dict) else body
    return {**error, "message": error.get("message") or exc.message}


def result_for_exception(request: RequestLine, exc: BaseException) -> str:
    """The error-file line for a request that raised `exc`. Never raises: an odd error must still end its request.

    Messages are cut to formats.MAX_MESSAGE_CHARS and made valid Unicode, whatever the backend sent.
    """
    try:
        return _line_for_exception(request.custom_id, exc)
    except Exception:  # e.g. an exception whose __str__ raises
        return _internal_error_line(request.custom_id)


def _line_for_exception(custom_id: str, exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return formats.http_error_line(custom_id, exc.status_code, _backend_error(exc), exc.request_id)
    if isinstance(exc, ValidationError):  # pydantic's own text quotes the input and links its docs
        problems = [(tuple(e["loc"]), e["msg"]) for e in exc.errors(include_url=False, include_input=False)]
        return formats.http_error_line(custom_id, 400, formats.invalid_body_error(problems))
    status_code = status_code_of(exc)
    if status_code is not None and 400 <= status_code < 600:
        error_type = "invalid_request_error" if status_code < 500 else "server_error"
        code = getattr(exc, "code", None)
        error = {"message": str(exc), "type": error_type, "code": code if isinstance(code, str) else None}
        return formats.http_error_line(custom_id, status_code, error)
    if isinstance(exc, ValueError):  # the stack's APIs refuse a request so (the stack itself answers them 400)
        return formats.http_error_line(custom_id, 400, {"message": str(exc), "type": "invalid_request_error"})
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return formats.failure_line(custom_id, "timeout", str(exc) or "The request timed out.")
    if isinstance(exc, openai.APIConnectionError | ConnectionError):
        return formats.failure_line(custom_id, "connection_error", connection_message(exc))
    return formats.failure_line(custom_id, "internal_error", f"{type(exc).__name__}: {exc}")
