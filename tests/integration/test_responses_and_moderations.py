"""Batches of /v1/responses and /v1/moderations through a real stack serving the Responses API (its
built-in provider, which streams chat completions from the stand-in) and the Safety API (Llama Guard
over the stand-in's guard model); and a stack without those APIs, which refuses both endpoints."""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import Batch

from tests.integration.batching import read_result_file, upload_jsonl, wait_for_batch
from tools.harness import ON_OGX, ServerProcess, StandInControl, run_yaml_without, start_stack, warm_up

RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"
needs_safety = pytest.mark.skipif(ON_OGX, reason="OGX has no Safety API")


def lines_for(endpoint: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": b} for i, b in enumerate(bodies)]


def run(client: OpenAI, endpoint: str, bodies: list[dict[str, Any]]) -> tuple[Batch, dict[str, dict[str, Any]]]:
    """Run a batch of `bodies` to its end; return it and its result lines (output and errors) by custom_id."""
    file_id = upload_jsonl(client, lines_for(endpoint, bodies))
    created = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    batch = wait_for_batch(client, created.id)
    results = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            results.update({line["custom_id"]: line for line in read_result_file(client, file_id)})
    return batch, results


def output_text(response_body: dict[str, Any]) -> str:
    return "".join(
        part["text"] for item in response_body["output"] if item["type"] == "message" for part in item["content"]
    )


def test_a_responses_batch_completes_as_the_responses_api_answers(
    openai_client: OpenAI, standin: StandInControl
) -> None:
    tag = uuid.uuid4().hex[:8]
    stores: list[bool | None] = [None, True, False] * 4
    bodies = []
    for i, store in enumerate(stores):
        body: dict[str, Any] = {"model": "local/m-chat", "input": f"{tag} question {i}", "instructions": "be brief"}
        if store is not None:
            body["store"] = store
        bodies.append(body)
    batch, results = run(openai_client, RESPONSES, bodies)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.completed, batch.request_counts.failed) == (12, 0)
    assert batch.model == "local/m-chat"
    # Each Response reached the model as one chat completion (streamed, as the Responses provider asks).
    # Counted by this test's tag: the stand-in serves the other tests' stacks too.
    assert sum(count for prompt, count in standin.stats()["by_prompt"].items() if tag in prompt) == 12
    usage = {"input_tokens": 0, "output_tokens": 0}
    for i in range(12):
        line = results[f"c{i}"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert (body["object"], body["status"], body["background"]) == ("response", "completed", False)
        assert f"{tag} question {i}" in output_text(body)
        usage["input_tokens"] += body["usage"]["input_tokens"]
        usage["output_tokens"] += body["usage"]["output_tokens"]
    assert usage["output_tokens"] > 0
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (usage["input_tokens"], usage["output_tokens"])
    # `store` as in the Responses API: stored unless the line says `store: false`.
    stored = openai_client.responses.retrieve(results["c0"]["response"]["body"]["id"])
    assert f"{tag} question 0" in stored.output_text
    assert openai_client.responses.retrieve(results["c1"]["response"]["body"]["id"]).id
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(results["c2"]["response"]["body"]["id"])


def test_a_responses_line_continues_a_stored_response(openai_client: OpenAI) -> None:
    tag = uuid.uuid4().hex[:8]
    first = openai_client.responses.create(model="local/m-chat", input=f"{tag} remember this", store=True)
    body = {"model": "local/m-chat", "input": "and then?", "previous_response_id": first.id}
    batch, results = run(openai_client, RESPONSES, [body])
    assert batch.status == "completed", batch.errors
    answer = results["c0"]["response"]["body"]
    assert f"{tag} remember this" in output_text(answer)  # the stand-in echoes the whole conversation


def test_responses_requests_are_retried_and_their_errors_recorded(
    openai_client: OpenAI, standin: StandInControl
) -> None:
    standin.configure(fail_503=0.3)
    tag = uuid.uuid4().hex[:8]
    bodies = [{"model": "local/m-chat", "input": f"{tag} retried {i}", "store": False} for i in range(20)]
    refused_prompt = f"{tag} refused [[status:400]]"
    bodies.append({"model": "local/m-chat", "input": refused_prompt, "store": False})
    batch, results = run(openai_client, RESPONSES, bodies)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (20, 1)
    assert all(results[f"c{i}"]["response"]["status_code"] == 200 for i in range(20))
    # The stack's Responses API reports a backend's 400 as `server_error`, as it does a 503 (it keeps
    # the error's code, not its status): the request is retried like one, within its attempts, and
    # recorded as the stack answers it.
    refused = results["c20"]
    assert refused["response"]["status_code"] == 500
    assert refused["response"]["body"]["error"]["code"] == "server_error"
    assert "Forced status 400" in refused["response"]["body"]["error"]["message"]
    assert standin.stats()["by_prompt"][refused_prompt] == 5  # run.yaml's max_attempts


@needs_safety
def test_a_moderations_batch_completes_with_moderation_objects(openai_client: OpenAI) -> None:
    bodies = [
        {"input": "a recipe for lemon cake"},  # no model: the stack's default shield
        {"input": "how to build a bomb", "model": "local/m-guard"},
        {"input": ["how to build a bomb", "and a kite"]},
    ]
    batch, results = run(openai_client, MODERATIONS, bodies)
    assert batch.status == "completed", batch.errors
    assert batch.model == "local/m-guard"  # what the default shield resolves to
    assert batch.usage.total_tokens == 0
    bodies_out = [results[f"c{i}"]["response"]["body"] for i in range(3)]
    assert all(body["id"].startswith("modr-") and body["model"] == "local/m-guard" for body in bodies_out)
    assert [body["results"][0]["flagged"] for body in bodies_out] == [False, True, True]
    flagged = bodies_out[1]["results"][0]
    assert flagged["categories"]["Indiscriminate Weapons"] is True
    assert flagged["category_applied_input_types"]["Indiscriminate Weapons"] == ["text"]


@pytest.mark.parametrize(
    ("endpoint", "body", "code", "param"),
    [
        (RESPONSES, {"model": "local/m-chat"}, "invalid_request", "body.input"),
        (RESPONSES, {"model": "local/m-chat", "input": "x", "stream": True}, "streaming_unsupported", "body.stream"),
        (RESPONSES, {"model": "local/m-chat", "input": "x", "background": True}, "invalid_request", "body.background"),
        (RESPONSES, {"model": "local/no-such-model", "input": "x"}, "model_not_found", "body.model"),
        pytest.param(
            MODERATIONS, {"input": "x", "model": "local/m-chat"}, "model_not_found", "body.model", marks=needs_safety
        ),
        pytest.param(MODERATIONS, {"input": 5}, "invalid_request", "body.input", marks=needs_safety),
    ],
)
def test_lines_of_the_new_endpoints_are_validated(
    openai_client: OpenAI, endpoint: str, body: dict[str, Any], code: str, param: str
) -> None:
    good = {"model": "local/m-chat", "input": "fine"} if endpoint == RESPONSES else {"input": "fine"}
    batch, _ = run(openai_client, endpoint, [good, body])
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [(code, 2, param)]


@pytest.fixture(scope="module")
def stack_without_responses_and_safety(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    run_yaml = run_yaml_without(run_dir, {"responses", "safety"})
    server = start_stack(run_dir, run_dir / "plain-state", f"{standin_server.url}/v1", run_yaml=run_yaml)
    warm_up(server)
    yield server
    server.stop()


def test_a_stack_without_the_apis_refuses_their_endpoints_with_a_400(
    stack_without_responses_and_safety: ServerProcess,
) -> None:
    client = OpenAI(base_url=f"{stack_without_responses_and_safety.url}/v1", api_key="none", max_retries=0)
    file_id = upload_jsonl(client, lines_for(RESPONSES, [{"model": "local/m-chat", "input": "x"}]))
    for endpoint, api in ((RESPONSES, "Responses"), (MODERATIONS, "Safety")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
        error = refused.value
        assert (error.code, error.param, error.type) == ("invalid_value", "endpoint", "invalid_request_error")
        assert f"{api} API" in error.message
    assert client.batches.list().data == []
    # The provider itself loaded: other endpoints work.
    chat = {"model": "local/m-chat", "messages": [{"role": "user", "content": "hello"}]}
    batch, _ = run(client, "/v1/chat/completions", [chat])
    assert batch.status == "completed"
