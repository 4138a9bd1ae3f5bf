"""The API's errors in OpenAI's shape: what BatchesAPI answers for each error the service raises."""

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from llama_stack.core.access_control.access_control import AccessDeniedError
from llama_stack.core.server.fastapi_router_registry import build_fastapi_router
from llama_stack_api import Api, BatchNotFoundError, ConflictError, CreateBatchRequest
from starlette.responses import JSONResponse

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.http_errors import BatchesAPI, openai_error, use_openai_error_routes
from llama_stack_provider_batches.user_limits import LimitReachedError
from llama_stack_provider_batches.validation import InvalidParameterError


def error_object(response: Any) -> dict[str, Any]:
    assert isinstance(response, JSONResponse)
    return json.loads(response.body)["error"]


async def test_a_refused_parameter_is_a_400_with_param_code_and_type_as_fields(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    api = BatchesAPI(idle_provider)
    response = await api.create_batch(**{**sample_batch_data, "endpoint": "/v1/images/generations"})
    assert response.status_code == 400
    error = error_object(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "endpoint", "invalid_value")
    assert error["message"].startswith("Invalid value for 'endpoint': '/v1/images/generations'.")
    assert response.headers["x-should-retry"] == "false"


async def test_a_reused_idempotency_key_is_a_409_the_sdk_does_not_retry(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    api = BatchesAPI(idle_provider)
    first = await api.create_batch(**sample_batch_data, idempotency_key="k")
    assert first.id.startswith("batch_")
    assert (await api.create_batch(**sample_batch_data, idempotency_key="k")).id == first.id
    response = await api.create_batch(**{**sample_batch_data, "metadata": {"other": "x"}}, idempotency_key="k")
    assert response.status_code == 409
    error = error_object(response)
    assert (error["param"], error["code"]) == ("idempotency_key", "idempotency_key_reused")
    assert "metadata" in error["message"]
    assert response.headers["x-should-retry"] == "false"


async def test_retrieve_cancel_and_list_answer_their_errors_too(idle_provider: BatchesService) -> None:
    api = BatchesAPI(idle_provider)
    for response in (await api.retrieve_batch("batch_nope"), await api.cancel_batch("batch_nope")):
        assert response.status_code == 404
        assert error_object(response)["type"] == "invalid_request_error"
    listed = await api.list_batches(limit=0)
    assert listed.status_code == 400
    assert error_object(listed)["param"] == "limit"
    assert (await api.list_batches()).data == []


def test_each_error_gets_its_status_and_only_a_429_stays_retryable() -> None:
    cases = {
        InvalidParameterError("after", "bad cursor", "invalid_request"): (400, "after", "invalid_request"),
        BatchNotFoundError("batch_x"): (404, None, None),
        ConflictError("Cannot cancel a batch with status 'completed'."): (409, None, None),
        LimitReachedError("too many"): (429, None, "rate_limit_exceeded"),
        AccessDeniedError(): (403, None, None),
    }
    for exc, (status, param, code) in cases.items():
        error = openai_error(exc)
        assert error is not None
        assert (error.status, error.param, error.code) == (status, param, code)
        assert error.message == str(exc)
        assert (error.headers() == {}) == (status == 429)


def test_an_unexpected_error_is_left_to_the_stack() -> None:
    assert openai_error(RuntimeError("boom")) is None


@given(st.text(max_size=100), st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_any_refusal_keeps_its_message_param_and_code(message: str, param: str, code: str) -> None:
    error = openai_error(InvalidParameterError(param, message, code))
    assert error is not None
    assert error.body() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    json.dumps(error.body())


async def test_the_stack_builds_its_batches_routes_over_batches_api(provider: BatchesService) -> None:
    # get_provider_impl (the `provider` fixture) registered the routes; the stack builds them so.
    router = build_fastapi_router(Api.batches, provider)
    assert router is not None
    create = next(route for route in router.routes if route.path == "/v1/batches" and "POST" in route.methods)
    assert use_openai_error_routes()  # again: still ours, nothing changes
    body = {"input_file_id": "file-x", "endpoint": "/v1/images/generations", "completion_window": "24h"}
    response = await create.endpoint(request=CreateBatchRequest(**body))
    assert response.status_code == 400
    assert error_object(response)["param"] == "endpoint"
