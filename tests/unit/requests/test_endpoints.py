import asyncio
import errno
import json
from collections.abc import Callable
from typing import Any
from unittest import mock

import httpx
import openai
import psycopg2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from llama_stack_provider_batches.domain import formats
from llama_stack_provider_batches.domain.outages import DependencyGate
from llama_stack_provider_batches.requests import endpoints
from llama_stack_provider_batches.requests.endpoints import (
    DeadlineReached,
    RequestSender,
    ResponseFailedError,
    call_endpoint,
    response_tokens,
    result_for_exception,
    result_for_response,
)
from llama_stack_provider_batches.requests.input_file import RequestLine
from llama_stack_provider_batches.requests.resilience import AdaptiveLimit, RateLimiter, RetryPolicy
from llama_stack_provider_batches.requests.stack_apis import EndpointUnavailableError, StackAPIs
from llama_stack_provider_batches.stack import (
    OpenAIChatCompletion,
    OpenAIChatCompletionRequestWithExtraBody,
    ResponseNotFoundError,
)
from tests.unit.conftest import HAS_SAFETY, FakeInference, FakeModels, FakeResponses, FakeSafety
from tests.unit.result_lines import any_text, assert_result_line, json_values

REQUEST = RequestLine(line=1, custom_id="c1", body={"model": "m", "messages": []})


def status_error(status: int, body: object) -> openai.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://x"), headers={"x-request-id": "req_9"})
    return openai.APIStatusError("backend said no", response=response, body=body)


def result_line(exc: BaseException) -> dict:
    return json.loads(result_for_exception(REQUEST, exc))


def test_backend_http_error_keeps_status_and_error_body() -> None:
    line = result_line(status_error(400, {"error": {"message": "bad", "code": "c", "param": "p"}}))
    assert line["response"]["status_code"] == 400
    assert line["response"]["request_id"] == "req_9"
    assert line["response"]["body"]["error"]["message"] == "bad"
    assert line["response"]["body"]["error"]["param"] == "p"


def test_backend_error_body_already_unwrapped_by_the_client() -> None:
    line = result_line(status_error(503, {"message": "busy", "type": "server_error"}))
    assert line["response"]["status_code"] == 503
    assert line["response"]["body"]["error"]["type"] == "server_error"


def test_the_stacks_own_refusals_keep_their_status() -> None:
    # The stack's errors carry an httpx.codes member; its APIs refuse other requests with a ValueError.
    missing = result_line(ResponseNotFoundError("resp_gone"))
    assert missing["response"]["status_code"] == 404 and "resp_gone" in missing["response"]["body"]["error"]["message"]
    refused = result_line(ValueError("No shield associated with provider_resource id local/x"))
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_a_connection_failure_names_the_backend_it_could_not_reach() -> None:
    request = httpx.Request("POST", "http://10.0.0.9:8000/v1/chat/completions?x=1")
    line = result_line(openai.APIConnectionError(request=request))
    assert line["error"]["code"] == "connection_error"
    assert "http://10.0.0.9:8000/v1/chat/completions." in line["error"]["message"]


def test_retries_are_warned_of_at_most_every_ten_seconds_per_model_and_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[dict] = []
    monkeypatch.setattr(endpoints.logger, "warning", lambda event, **fields: warnings.append(fields))
    now = [0.0]
    log = endpoints.RetryLog(clock=lambda: now[0])
    for _ in range(3):
        log.retried("local/m-chat", "http_503", RuntimeError("busy"))
    log.retried("local/m-chat", "timeout", RuntimeError("slow"))
    now[0] = 10.0
    log.retried("local/m-chat", "http_503", RuntimeError("busy"))
    assert [(w["cause"], w["not_shown"]) for w in warnings] == [("http_503", 0), ("timeout", 0), ("http_503", 2)]


def test_no_http_answer_gives_an_error_object() -> None:
    timeout = result_line(TimeoutError())
    assert timeout["response"] is None and timeout["error"]["code"] == "timeout"
    other = result_line(RuntimeError("boom"))
    assert other["error"] == {"code": "internal_error", "message": "RuntimeError: boom"}


def only_inference(inference: FakeInference) -> StackAPIs:
    return StackAPIs(inference=inference, models=FakeModels(set()))  # type: ignore[arg-type]


async def test_call_endpoint_validates_and_dumps_the_response() -> None:
    inference = FakeInference()
    apis = only_inference(inference)
    response = await call_endpoint(
        apis, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.object == "chat.completion"
    assert response_tokens(response) == (3, 2)
    assert inference.calls[0]["model"] == "m"
    with pytest.raises(ValueError):
        await call_endpoint(apis, "/v1/images/generations", {"model": "m"})


async def test_responses_run_through_the_responses_api() -> None:
    inference = FakeInference()
    responses = FakeResponses(inference)
    apis = StackAPIs(inference, FakeModels(set()), responses)  # type: ignore[arg-type]
    body = {"model": "local/m-chat", "input": "hello", "instructions": "be brief", "store": False}
    response = await call_endpoint(apis, "/v1/responses", body)
    assert response.object == "response"
    assert response_tokens(response) == (4, 6)  # a Response counts input_tokens and output_tokens
    assert responses.requests[0]["instructions"] == "be brief"
    assert responses.requests[0]["store"] is False


@pytest.mark.skipif(not HAS_SAFETY, reason="OGX has no Safety API")
async def test_moderations_run_through_the_safety_api() -> None:
    inference = FakeInference()
    apis = StackAPIs(inference, FakeModels(set()), safety=FakeSafety(inference))  # type: ignore[arg-type]
    moderation = await call_endpoint(apis, "/v1/moderations", {"input": ["a cake", "a bomb"]})
    assert [r["flagged"] for r in moderation.results] == [False, True]
    assert response_tokens(moderation) == (0, 0)  # moderations report no usage


# The stack keeps a failure's code, not its status: a 503 comes back as server_error, answered 500.
@pytest.mark.parametrize(
    ("status", "code", "attempts", "answered"),
    [(503, "server_error", 3, 500), (429, "rate_limit_exceeded", 3, 429), (400, "invalid_prompt", 1, 400)],
)
async def test_a_failed_response_keeps_its_error_code_so_only_curable_failures_are_retried(
    status: int, code: str, attempts: int, answered: int
) -> None:
    inference = FakeInference()

    def fail(_: dict) -> None:
        raise status_error(status, {"error": {"message": "backend said no"}})

    inference.behaviour = fail
    apis = StackAPIs(inference, FakeModels(set()), FakeResponses(inference))  # type: ignore[arg-type]
    sender = RequestSender(apis, RetryPolicy(3, 0.001, 0.01), timeout_seconds=5)
    body = {"model": "m", "input": "x"}
    with pytest.raises(ResponseFailedError) as failed:
        await sender.send("/v1/responses", body, AdaptiveLimit(4), asyncio.Event())
    assert len(inference.calls) == attempts
    line = json.loads(result_for_exception(REQUEST, failed.value))
    assert line["response"]["status_code"] == answered
    assert line["response"]["body"]["error"]["code"] == code
    assert "backend said no" in line["response"]["body"]["error"]["message"]


@pytest.mark.parametrize(("endpoint", "api"), [("/v1/responses", "Responses"), ("/v1/moderations", "Safety")])
async def test_an_endpoint_whose_api_the_stack_lacks_fails_its_request_with_a_400(endpoint: str, api: str) -> None:
    with pytest.raises(EndpointUnavailableError) as raised:
        await call_endpoint(only_inference(FakeInference()), endpoint, {"model": "m", "input": "x"})
    line = json.loads(result_for_exception(REQUEST, raised.value))
    assert line["response"]["status_code"] == 400
    assert f"{api} API" in line["response"]["body"]["error"]["message"]


def make_sender(inference: FakeInference, attempts: int = 3, timeout: float = 5.0) -> RequestSender:
    return RequestSender(only_inference(inference), RetryPolicy(attempts, 0.001, 0.01), timeout_seconds=timeout)


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


async def test_transient_failures_are_retried_until_success() -> None:
    inference = FakeInference()

    def fail_twice(_: dict) -> None:
        if len(inference.calls) <= 2:
            raise status_error(503, {"error": {"message": "busy"}})

    inference.behaviour = fail_twice
    window = AdaptiveLimit(4)
    response = await make_sender(inference).send("/v1/chat/completions", CHAT_BODY, window, asyncio.Event())
    assert response.object == "chat.completion"
    assert len(inference.calls) == 3


@pytest.mark.parametrize(
    ("failure", "shrinks"),
    [
        (lambda: status_error(503, {"error": {"message": "busy"}}), True),  # the backend is overloaded
        (lambda: RuntimeError("a bug inside the stack"), False),  # says nothing of the backend's capacity
    ],
    ids=["backend-503", "stack-internal"],
)
async def test_only_the_backends_failures_shrink_the_models_window(
    failure: Callable[[], Exception], shrinks: bool
) -> None:
    inference = FakeInference()

    def fail_twice(_: dict) -> None:
        if len(inference.calls) <= 2:
            raise failure()

    inference.behaviour = fail_twice
    window = AdaptiveLimit(4)
    response = await make_sender(inference).send("/v1/chat/completions", CHAT_BODY, window, asyncio.Event())
    assert response.object == "chat.completion" and len(inference.calls) == 3
    assert (window.limit < 4) is shrinks


async def test_permanent_failures_are_not_retried() -> None:
    inference = FakeInference()

    def refuse(_: dict) -> None:
        raise status_error(400, {"error": {"message": "bad"}})

    inference.behaviour = refuse
    with pytest.raises(openai.APIStatusError):
        await make_sender(inference).send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event())
    assert len(inference.calls) == 1


async def test_attempts_run_out_with_the_last_failure() -> None:
    inference = FakeInference()

    def always_busy(_: dict) -> None:
        raise status_error(503, {"error": {"message": "still busy"}})

    inference.behaviour = always_busy
    with pytest.raises(openai.APIStatusError, match="backend said no"):
        await make_sender(inference).send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event())
    assert len(inference.calls) == 3


async def test_a_stalled_attempt_is_cut_off_and_retried() -> None:
    inference = FakeInference()

    async def stall_first(_: dict) -> None:
        if len(inference.calls) == 1:
            await asyncio.sleep(30)

    inference.behaviour = stall_first
    sender = make_sender(inference, timeout=0.1)
    response = await asyncio.wait_for(
        sender.send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event()), 5
    )
    assert response.object == "chat.completion"
    assert len(inference.calls) == 2


async def test_no_retry_once_the_server_is_stopping() -> None:
    inference = FakeInference()

    def busy(_: dict) -> None:
        raise status_error(503, {})

    inference.behaviour = busy
    stopping = asyncio.Event()
    stopping.set()
    with pytest.raises(openai.APIStatusError):
        await make_sender(inference).send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), stopping)
    assert len(inference.calls) == 1


async def test_the_pace_spaces_requests_to_one_model() -> None:
    inference = FakeInference()
    sender = RequestSender(
        only_inference(inference), RetryPolicy(1), timeout_seconds=5, pacer=RateLimiter(per_second=50)
    )
    started = asyncio.get_running_loop().time()
    for _ in range(6):
        await sender.send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event())
    assert asyncio.get_running_loop().time() - started >= 0.09  # 5 intervals of 20 ms


# --- whatever a model answers or a backend raises: one valid line, never an exception (issue 11) -----


class Answer(BaseModel):
    value: Any = None
    usage: Any = None


def expected_body(response: BaseModel) -> tuple[str, Any]:
    """("ok", body) when a response can be a success line under the size limit, else the error code."""
    try:
        body_json = response.model_dump_json()
        size = len(body_json.encode("utf-8"))
    except Exception:
        return "invalid_response", None
    return ("ok", json.loads(body_json)) if size <= formats.MAX_RESPONSE_BYTES else ("response_too_large", None)


@settings(max_examples=200, deadline=None)
@given(st.text(), json_values, json_values, st.integers(0, 400))
def test_any_response_gives_one_valid_line(custom_id: str, value: object, usage: object, limit: int) -> None:
    response = Answer(value=value, usage=usage)
    with mock.patch.object(formats, "MAX_RESPONSE_BYTES", limit):
        ok, text, input_tokens, output_tokens = result_for_response(custom_id, response)
        outcome, body = expected_body(response)
    line = assert_result_line(text)
    assert line["custom_id"] == custom_id
    assert ok is (outcome == "ok")
    if ok:
        assert line["response"]["body"] == body
        assert (input_tokens, output_tokens) == formats.token_usage(body)
    else:
        assert line["response"] is None and line["error"]["code"] == outcome
        assert (input_tokens, output_tokens) == (0, 0)


def test_a_response_with_a_lone_surrogate_is_an_invalid_response() -> None:
    ok, text, *tokens = result_for_response("c", Answer(value="bad \ud800", usage={"prompt_tokens": 3}))
    assert (ok, tokens) == (False, [0, 0])
    assert assert_result_line(text)["error"]["code"] == "invalid_response"


def test_a_response_over_the_size_limit_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "MAX_RESPONSE_BYTES", 100)
    ok, text, *_ = result_for_response("c", Answer(value="é" * 45))  # 90 characters, 99 bytes with the braces
    assert not ok and assert_result_line(text)["error"]["code"] == "response_too_large"
    ok, _, *_ = result_for_response("c", Answer(value="e" * 45))
    assert ok


class Unserializable(BaseModel):
    def model_dump_json(self, **_: Any) -> str:  # type: ignore[override]
        raise RuntimeError("cannot")


class OddUsage(BaseModel):
    @property
    def usage(self) -> Any:
        raise RuntimeError("no usage")


def test_a_response_that_cannot_be_dumped_or_counted_still_gives_a_line() -> None:
    ok, text, *_ = result_for_response("c", Unserializable())
    assert not ok and assert_result_line(text)["error"]["code"] == "invalid_response"
    ok, text, *tokens = result_for_response("c", OddUsage())
    assert ok and tokens == [0, 0]
    assert assert_result_line(text)["response"]["body"] == {}


def test_null_fields_of_a_response_stay_in_its_body() -> None:
    completion = OpenAIChatCompletion.model_validate(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        }
    )
    ok, text, *_ = result_for_response("c", completion)
    choice = assert_result_line(text)["response"]["body"]["choices"][0]
    assert ok and choice["logprobs"] is None
    assert choice["message"]["refusal"] is None and choice["message"]["tool_calls"] is None


def test_a_success_counts_the_tokens_it_reports() -> None:
    response = Answer(value="x\u2028y", usage={"prompt_tokens": 4, "completion_tokens": 5})
    ok, text, *tokens = result_for_response("c", response)
    assert ok and tokens == [4, 5]
    assert assert_result_line(text)["response"]["body"]["value"] == "x\u2028y"


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def exceptions() -> st.SearchStrategy[BaseException]:
    message = any_text.map(lambda text: text * 300)
    plain = st.builds(
        lambda kind, text: kind(text), st.sampled_from([RuntimeError, TimeoutError, ConnectionError]), message
    )
    http = st.builds(
        lambda status, body: status_error(status, body),
        st.integers(400, 599),
        st.one_of(json_values, st.dictionaries(st.sampled_from(["error", "message", "type", "code"]), json_values)),
    )
    return st.one_of(plain, http, st.just(UnprintableError()))


@settings(max_examples=200, deadline=None)
@given(st.text(), exceptions())
def test_any_exception_gives_one_bounded_valid_line(custom_id: str, exc: BaseException) -> None:
    text = result_for_exception(RequestLine(line=1, custom_id=custom_id, body={}), exc)
    line = assert_result_line(text)
    assert line["custom_id"] == custom_id
    assert len(text) <= 12 * (formats.MAX_MESSAGE_CHARS + 4 * formats.MAX_ERROR_FIELD_CHARS + len(custom_id)) + 300


def test_an_exception_that_cannot_be_described_is_an_internal_error() -> None:
    line = result_line(UnprintableError())
    assert line["error"]["code"] == "internal_error"


def test_huge_backend_errors_are_cut_short() -> None:
    body = {"error": {"message": "m\ud800" * 100_000, "code": 10**5000, "type": ["t"] * 1000, "param": "p" * 10**6}}
    line = result_line(status_error(400, body))
    detail = line["response"]["body"]["error"]
    assert len(detail["message"]) <= formats.MAX_MESSAGE_CHARS and "\ufffd" in detail["message"]
    assert all(len(detail[name]) <= formats.MAX_ERROR_FIELD_CHARS for name in ("code", "type", "param"))


def test_a_body_the_stack_refuses_gets_a_short_error_without_the_input_or_a_link() -> None:
    body = {"model": "m", "messages": [{"role": "wizard", "content": "SECRET-INPUT"}]}
    with pytest.raises(ValidationError) as refused:
        OpenAIChatCompletionRequestWithExtraBody.model_validate(body)
    line = assert_result_line(result_for_exception(RequestLine(line=1, custom_id="c", body=body), refused.value))
    error = line["response"]["body"]["error"]
    assert line["response"]["status_code"] == 400
    assert error["message"].startswith("Invalid request body: messages[0]")
    assert "SECRET-INPUT" not in error["message"] and "http" not in error["message"]
    assert error["param"].startswith("messages[0]") and error["code"] == "invalid_request"


async def test_a_request_that_meets_an_outage_goes_again_without_using_an_attempt_or_capacity() -> None:
    inference = FakeInference()

    def registry_down_five_times(_: dict) -> None:
        if len(inference.calls) <= 5:  # the stack's registry lookup, before the backend is reached
            raise psycopg2.InterfaceError("cursor already closed")

    inference.behaviour = registry_down_five_times
    window = AdaptiveLimit(8)
    sender = make_sender(inference, attempts=2)
    sender.gate = DependencyGate(initial_pause=0.001, max_pause=0.002)
    response = await sender.send("/v1/chat/completions", CHAT_BODY, window, asyncio.Event())
    assert response.object == "chat.completion"
    assert len(inference.calls) == 6  # five outages, none an attempt of the two
    assert window.limit == 8  # the model is not to blame
    assert sender.gate.is_open and sender.gate.outages == 1


async def test_a_request_waits_while_the_gate_is_closed_and_past_the_deadline_is_not_sent() -> None:
    inference = FakeInference()
    sender = make_sender(inference)
    sender.gate = DependencyGate(initial_pause=0.2)
    sender.gate.trip(OSError(errno.EROFS, "Read-only file system"))  # results cannot be stored
    sending = asyncio.create_task(sender.send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event()))
    await asyncio.sleep(0.1)
    assert inference.calls == []  # nothing new goes out meanwhile
    await sending
    assert len(inference.calls) == 1
    sender.gate.trip(OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(DeadlineReached):
        await sender.send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event(), expired=lambda: True)
    assert len(inference.calls) == 1
