"""The API's errors in OpenAI's shape: the stack's own /v1/batches routes, built as the stack builds them
after get_provider_impl, answering every error the provider or the request validation raises."""

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.api.http_errors import openai_error, use_openai_error_routes
from llama_stack_provider_batches.api.idempotency import IdempotencyConflictError
from llama_stack_provider_batches.api.validation import SUPPORTED_ENDPOINTS
from llama_stack_provider_batches.domain.errors import InvalidParameterError, LimitReachedError
from llama_stack_provider_batches.domain.lifecycle import BatchNotCancellableError
from llama_stack_provider_batches.stack import (
    AccessDeniedError,
    Api,
    BatchNotFoundError,
    ConflictError,
    CreateBatchRequest,
    fastapi_router_registry,
)
from tests.unit.conftest import HAS_SAFETY
from tools.harness import free_port


@pytest.fixture
async def http(idle_provider: BatchesService) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the batches routes the stack builds over the provider (the fixture ran get_provider_impl)."""
    router = fastapi_router_registry.build_fastapi_router(Api.batches, idle_provider)
    assert router is not None
    app = FastAPI()
    app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stack") as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


async def test_a_refused_parameter_is_a_400_with_param_code_and_type_as_fields(
    http: httpx.AsyncClient, sample_batch_data: dict[str, Any]
) -> None:
    response = await http.post("/v1/batches", json={**sample_batch_data, "endpoint": "/v1/images/generations"})
    error = error_of(response, 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "endpoint", "invalid_value")
    assert error["message"].startswith("Invalid value for 'endpoint': '/v1/images/generations'.")
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"completion_window": "48h"}, "completion_window", "invalid_value"),
        ({"metadata": "not an object"}, "metadata", "invalid_type"),
        ({"input_file_id": None}, "input_file_id", "missing_required_parameter"),
    ],
)
async def test_what_the_stack_refuses_before_the_provider_runs_is_shaped_too(
    http: httpx.AsyncClient, sample_batch_data: dict[str, Any], change: dict[str, Any], param: str, code: str
) -> None:
    body = {key: value for key, value in {**sample_batch_data, **change}.items() if value is not None}
    error = error_of(await http.post("/v1/batches", json=body), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert "not an object" not in error["message"]  # the caller's value is not echoed


@pytest.mark.parametrize(("value", "got"), [(["a", "b"], "an array"), (3, "an integer"), (None, "null")])
async def test_a_metadata_value_that_is_not_a_string_is_named_by_its_key_as_openai_does(
    http: httpx.AsyncClient, sample_batch_data: dict[str, Any], value: Any, got: str
) -> None:
    # The stack's own validation of the body refuses it before the provider runs: the same answer as the provider's.
    body = {**sample_batch_data, "metadata": {"source": "cli", "tags": value}}
    error = error_of(await http.post("/v1/batches", json=body), 400)
    assert error == {
        "message": f"Invalid type for 'metadata.tags': expected a string, but got {got} instead.",
        "type": "invalid_request_error",
        "param": "metadata.tags",
        "code": "invalid_type",
    }


async def test_a_body_that_is_not_json_is_a_400_in_openai_shape(http: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    response = await http.post("/v1/batches", content=b'{"input_file_id": ', headers=headers)
    error = error_of(response, 400)
    assert (error["message"], error["param"]) == ("We could not parse the JSON body of your request.", None)


async def test_a_reused_idempotency_key_is_a_409_the_sdk_does_not_retry(
    http: httpx.AsyncClient, sample_batch_data: dict[str, Any]
) -> None:
    first = await http.post("/v1/batches", json={**sample_batch_data, "idempotency_key": "k"})
    assert first.status_code == 200
    again = await http.post("/v1/batches", json={**sample_batch_data, "idempotency_key": "k"})
    assert again.json()["id"] == first.json()["id"]
    changed = {**sample_batch_data, "metadata": {"other": "x"}, "idempotency_key": "k"}
    response = await http.post("/v1/batches", json=changed)
    error = error_of(response, 409)
    assert (error["param"], error["code"]) == ("idempotency_key", "idempotency_key_reused")
    assert "metadata" in error["message"]
    assert response.headers["x-should-retry"] == "false"


async def test_retrieve_cancel_and_list_answer_their_errors_too(http: httpx.AsyncClient) -> None:
    assert error_of(await http.get("/v1/batches/batch_nope"), 404)["type"] == "invalid_request_error"
    assert error_of(await http.post("/v1/batches/batch_nope/cancel"), 404)["type"] == "invalid_request_error"
    assert error_of(await http.get("/v1/batches", params={"limit": 0}), 400)["param"] == "limit"
    assert (await http.get("/v1/batches")).json()["data"] == []


async def test_a_request_that_meets_an_outage_of_the_store_is_a_503_to_try_again(
    http: httpx.AsyncClient, idle_provider: BatchesService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idle_provider._store, "get", lambda *_: refused_by_driver())
    response = await http.get("/v1/batches/batch_abc")
    error = error_of(response, 503)
    assert (error["type"], error["code"]) == ("server_error", "service_unavailable")
    assert "try again" in error["message"] and "Connect call" not in error["message"]
    assert response.headers["retry-after"] == "1" and "x-should-retry" not in response.headers


async def refused_by_driver() -> None:
    """What asyncpg raises when the database refuses connections: a plain OSError, raised in its code."""
    await asyncpg.connect(host="127.0.0.1", port=free_port(), user="postgres", database="test", timeout=5)


async def test_python_callers_of_the_routes_and_the_provider_still_get_exceptions(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    # The stack's library client calls a route's function, not its HTTP handler.
    router = fastapi_router_registry.build_fastapi_router(Api.batches, idle_provider)
    assert router is not None
    create = next(route for route in router.routes if route.path == "/v1/batches" and "POST" in route.methods)
    await create.endpoint(request=CreateBatchRequest(**sample_batch_data, idempotency_key="k"))
    changed = CreateBatchRequest(**{**sample_batch_data, "metadata": {"x": "y"}}, idempotency_key="k")
    with pytest.raises(IdempotencyConflictError):
        await create.endpoint(request=changed)
    with pytest.raises(ConflictError):
        await idle_provider.create_batch(changed)


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
async def test_cancelling_a_finished_batch_is_a_409_with_a_code(
    http: httpx.AsyncClient, idle_provider: BatchesService, sample_batch_data: dict[str, Any], status: str
) -> None:
    batch = await idle_provider.create_batch(**sample_batch_data)
    await idle_provider._store.update(batch.id, lambda b: b.model_copy(update={"status": status}))
    response = await http.post(f"/v1/batches/{batch.id}/cancel")
    assert error_of(response, 409) == {
        "message": f"Cannot cancel a batch with status '{status}'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "batch_not_cancellable",
    }
    assert response.headers["x-should-retry"] == "false"


async def test_an_unknown_endpoint_lists_only_the_endpoints_this_stack_serves(
    http: httpx.AsyncClient, sample_batch_data: dict[str, Any]
) -> None:
    response = await http.post("/v1/batches", json={**sample_batch_data, "endpoint": "/v1/images/generations"})
    listed = error_of(response, 400)["message"].split("Supported values are: ")[1].rstrip(".").split(", ")
    # The unit stack serves every endpoint its APIs allow: moderations only where the stack has a Safety API.
    assert listed == [endpoint for endpoint in SUPPORTED_ENDPOINTS if endpoint != "/v1/moderations" or HAS_SAFETY]


def test_registering_the_routes_twice_changes_nothing() -> None:
    assert use_openai_error_routes()
    assert use_openai_error_routes()


def test_each_error_gets_its_status_and_only_a_429_stays_retryable() -> None:
    cases = {
        InvalidParameterError("after", "bad cursor", "invalid_request"): (400, "after", "invalid_request"),
        BatchNotFoundError("batch_x"): (404, None, None),
        ConflictError("A conflict the provider did not name."): (409, None, None),
        BatchNotCancellableError("batch_x", "completed"): (409, None, "batch_not_cancellable"),
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
