"""Batches of the endpoints served by the stack's Responses and Safety APIs: validation against what the
stack serves, result lines and usage, over fake APIs."""

from typing import Any

import pytest

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService, get_provider_impl
from llama_stack_provider_batches.api.validation import SUPPORTED_ENDPOINTS
from llama_stack_provider_batches.domain.errors import InvalidParameterError
from llama_stack_provider_batches.requests.input_reader import read_checked_input
from llama_stack_provider_batches.requests.stack_apis import ENDPOINT_APIS, StackAPIs
from llama_stack_provider_batches.stack import Api
from tests.unit.conftest import HAS_SAFETY, FakeFiles, FakeInference, FakeModels, FakeShields, stack_deps
from tests.unit.helpers import jsonl, make_batch, read_lines

RESPONSES = "/v1/responses"
needs_safety = pytest.mark.skipif(not HAS_SAFETY, reason="OGX has no Safety API")
MODERATIONS = "/v1/moderations"


def response_line(custom_id: str, text: str, model: str = "local/m-chat", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES, "body": {"model": model, "input": text, **body}}


def moderation_line(custom_id: str, text: str | list[str], model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"input": text} if model is None else {"input": text, "model": model}
    return {"custom_id": custom_id, "method": "POST", "url": MODERATIONS, "body": body}


async def run(provider: BatchesService, files: FakeFiles, endpoint: str, lines: list[dict[str, Any]]) -> Any:
    batch = await provider.create_batch(
        input_file_id=files.add(jsonl(lines)), endpoint=endpoint, completion_window="24h"
    )
    await provider._runner.wait_idle()
    return await provider.retrieve_batch(batch.id)


def test_every_endpoint_openai_batches_here_has_the_api_serving_it() -> None:
    assert set(SUPPORTED_ENDPOINTS) == set(ENDPOINT_APIS)


async def test_a_responses_batch_completes_with_response_objects_and_their_usage(
    provider: BatchesService, files: FakeFiles
) -> None:
    lines = [response_line(f"r{i}", f"question {i}", instructions="be brief") for i in range(5)]
    batch = await run(provider, files, RESPONSES, lines)
    assert batch.status == "completed"
    assert batch.model == "local/m-chat"
    results = read_lines(files, batch.output_file_id)
    assert sorted(line["custom_id"] for line in results) == [f"r{i}" for i in range(5)]
    body = next(line for line in results if line["custom_id"] == "r3")["response"]["body"]
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert "question 3" in body["echo"]
    # usage sums the Responses API's input_tokens and output_tokens (4 and 6 per request here)
    assert (batch.usage.input_tokens, batch.usage.output_tokens, batch.usage.total_tokens) == (20, 30, 50)


@needs_safety
async def test_a_moderations_batch_uses_the_stacks_default_model_when_a_line_names_none(
    provider: BatchesService, files: FakeFiles
) -> None:
    lines = [moderation_line("calm", "a cake recipe"), moderation_line("alarm", ["a bomb", "hi"], "local/m-guard")]
    batch = await run(provider, files, MODERATIONS, lines)
    assert batch.status == "completed"
    assert batch.model == "local/m-guard"  # what the default shield resolves to
    results = {line["custom_id"]: line["response"]["body"] for line in read_lines(files, batch.output_file_id)}
    assert [r["flagged"] for r in results["calm"]["results"]] == [False]
    assert [r["flagged"] for r in results["alarm"]["results"]] == [True, False]
    assert batch.usage.total_tokens == 0  # moderations report none


@needs_safety
async def test_a_moderation_model_is_known_only_as_a_shields_model(provider: BatchesService, files: FakeFiles) -> None:
    # local/m-chat is a model the stack serves, but no shield runs it: the safety API would refuse it.
    batch = await run(
        provider, files, MODERATIONS, [moderation_line("a", "x"), moderation_line("b", "y", "local/m-chat")]
    )
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("model_not_found", 2, "body.model")]
    assert batch.errors.data[0].message == "The provided model 'local/m-chat' is not supported by the Batch API."


@needs_safety
async def test_a_moderation_without_a_model_needs_a_default_in_the_stack(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    deps = stack_deps(files, inference, models)
    deps[Api("safety")].safety_config.default_shield_id = None
    provider = await get_provider_impl(config, deps)
    try:
        batch = await run(
            provider, files, MODERATIONS, [moderation_line("a", "x", "local/m-guard"), moderation_line("b", "y")]
        )
        assert batch.status == "failed"
        assert [(e.code, e.line) for e in batch.errors.data] == [("model_not_found", 2)]
        assert "safety.default_shield_id" in batch.errors.data[0].message
        assert inference.calls == []
    finally:
        await provider.shutdown()


@needs_safety
async def test_a_moderation_model_of_two_shields_is_refused_as_the_safety_api_would(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    deps = stack_deps(files, inference, models)
    shields: FakeShields = deps[Api("shields")]
    shields.shields = [*shields.shields, shields.shields[0].model_copy(update={"identifier": "guard-2"})]
    provider = await get_provider_impl(config, deps)
    try:
        batch = await run(provider, files, MODERATIONS, [moderation_line("a", "x", "local/m-guard")])
        assert [(e.code, e.line) for e in batch.errors.data] == [("model_not_found", 1)]
    finally:
        await provider.shutdown()


async def test_a_responses_line_in_background_mode_fails_validation(provider: BatchesService, files: FakeFiles) -> None:
    batch = await run(provider, files, RESPONSES, [response_line("a", "x"), response_line("b", "y", background=True)])
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("invalid_request", 2, "body.background")]


@pytest.mark.parametrize(("endpoint", "api"), [(RESPONSES, "Responses"), (MODERATIONS, "Safety")])
async def test_a_stack_without_the_api_refuses_the_endpoint_at_create(
    config: BatchesProviderConfig,
    files: FakeFiles,
    inference: FakeInference,
    models: FakeModels,
    endpoint: str,
    api: str,
) -> None:
    deps = {Api.files: files, Api.inference: inference, Api.models: models}
    provider = await get_provider_impl(config, deps)
    try:
        line = moderation_line("a", "x") if endpoint == MODERATIONS else response_line("a", "x")
        file_id = files.add(jsonl([line]))
        with pytest.raises(InvalidParameterError) as refused:
            await provider.create_batch(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
        assert (refused.value.status_code, refused.value.param, refused.value.code) == (
            400,
            "endpoint",
            "invalid_value",
        )
        assert f"{api} API" in str(refused.value)
        assert (await provider.list_batches()).data == []
    finally:
        await provider.shutdown()


async def test_a_batch_whose_api_the_stack_lost_since_its_create_fails_validation(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    apis = StackAPIs(inference=inference, models=models)  # type: ignore[arg-type]
    batch = make_batch(endpoint=RESPONSES, input_file_id=files.add(jsonl([response_line("a", "x")])))
    parsed = await read_checked_input(files, apis, batch)  # type: ignore[arg-type]
    assert [(e.code, e.param) for e in parsed.errors] == [("invalid_request", "endpoint")]
    assert "needs the stack's Responses API" in parsed.errors[0].message


@needs_safety
async def test_a_moderation_with_an_empty_or_null_model_uses_the_default_and_its_capacity(
    provider: BatchesService, files: FakeFiles
) -> None:
    lines = [moderation_line("a", "x"), moderation_line("b", "y")]
    lines[0]["body"]["model"] = None
    lines[1]["body"]["model"] = ""
    batch = await run(provider, files, MODERATIONS, lines)
    assert batch.status == "completed", batch.errors
    assert batch.model == "local/m-guard"
    # Its requests took slots of the model the stack runs them on, not of a pool named "None".
    assert set(provider._runner.scheduler._pools) == {"local/m-guard"}
