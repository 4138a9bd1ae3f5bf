import json

import httpx
import openai
import pytest

from llama_stack_provider_batches.endpoints import (
    call_endpoint,
    response_tokens,
    result_for_exception,
    without_completion_store,
)
from llama_stack_provider_batches.input_file import RequestLine
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
