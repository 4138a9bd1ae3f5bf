import asyncio
import json

import httpx
import openai
import pytest

from llama_stack_provider_batches.endpoints import (
    RequestSender,
    call_endpoint,
    response_tokens,
    result_for_exception,
    without_completion_store,
)
from llama_stack_provider_batches.input_file import RequestLine
from llama_stack_provider_batches.resilience import AdaptiveLimit, RateLimiter, RetryPolicy
from tests.unit.conftest import FakeInference

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


def test_no_http_answer_gives_an_error_object() -> None:
    timeout = result_line(TimeoutError())
    assert timeout["response"] is None and timeout["error"]["code"] == "timeout"
    other = result_line(RuntimeError("boom"))
    assert other["error"] == {"code": "internal_error", "message": "RuntimeError: boom"}


async def test_call_endpoint_validates_and_dumps_the_response() -> None:
    inference = FakeInference()
    response = await call_endpoint(
        inference, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.object == "chat.completion"
    assert response_tokens(response) == (3, 2)
    assert inference.calls[0]["model"] == "m"
    with pytest.raises(ValueError):
        await call_endpoint(inference, "/v1/moderations", {"model": "m"})


class RouterWithStore:
    def __init__(self) -> None:
        self.store = object()
        self.routing_table = object()


def test_without_completion_store_is_a_view_that_leaves_the_router_alone() -> None:
    router = RouterWithStore()
    view = without_completion_store(router)
    assert view.store is None
    assert view.routing_table is router.routing_table
    assert router.store is not None
    plain = FakeInference()
    assert without_completion_store(plain) is plain


def make_sender(inference: FakeInference, attempts: int = 3, timeout: float = 5.0) -> RequestSender:
    return RequestSender(inference, RetryPolicy(attempts, 0.001, 0.01), timeout_seconds=timeout)


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


async def test_the_traffic_budget_caps_requests_in_flight_across_windows() -> None:
    inference = FakeInference()

    async def slow(_: dict) -> None:
        await asyncio.sleep(0.02)

    inference.behaviour = slow
    sender = RequestSender(inference, RetryPolicy(1), timeout_seconds=5, budget=asyncio.Semaphore(2))
    windows = [AdaptiveLimit(10), AdaptiveLimit(10)]  # two batches, each allowed 10
    await asyncio.gather(
        *(sender.send("/v1/chat/completions", CHAT_BODY, windows[n % 2], asyncio.Event()) for n in range(8))
    )
    assert inference.max_in_flight == 2


async def test_the_pace_spaces_requests_to_one_model() -> None:
    inference = FakeInference()
    sender = RequestSender(inference, RetryPolicy(1), timeout_seconds=5, pacer=RateLimiter(per_second=50))
    started = asyncio.get_running_loop().time()
    for _ in range(6):
        await sender.send("/v1/chat/completions", CHAT_BODY, AdaptiveLimit(4), asyncio.Event())
    assert asyncio.get_running_loop().time() - started >= 0.09  # 5 intervals of 20 ms
