"""Hostile parameters through a real stack: oversized or malformed ids, keys and metadata, invalid
Unicode, files of the wrong purpose, and an access policy forbidding `create`. Every answer is a
4xx (never a 5xx), and the server keeps answering everyone else."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, upload_jsonl, wait_for_batch
from tests.integration.test_multi_user import USERS
from tools.harness import (
    OWNER_RULES,
    ServerProcess,
    run_yaml_with_access_policy,
    start_stack,
    token_endpoint,
    warm_up,
)

CHAT = "/v1/chat/completions"
MEGABYTE = 1024 * 1024


def post_raw_json(stack: ServerProcess, body: str) -> httpx.Response:
    """POST /v1/batches with `body` sent as it is: JSON text may hold escapes (a lone "\\ud800") no SDK would send."""
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{stack.url}/v1/batches", content=body.encode("ascii"), headers=headers, timeout=60)


def assert_refused(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code < 500, response.text[:500]
    assert response.status_code == status, response.text[:500]
    assert len(response.content) < 2000  # the caller's text is not echoed back in full
    if param is not None:
        assert param in response.text


@pytest.fixture
def batch_file(openai_client: OpenAI) -> str:
    return upload_jsonl(openai_client, chat_lines(1))


def test_an_oversized_idempotency_key_is_400(openai_client: OpenAI, batch_file: str) -> None:
    with pytest.raises(openai.BadRequestError, match="idempotency_key") as info:
        openai_client.batches.create(
            input_file_id=batch_file,
            endpoint=CHAT,
            completion_window="24h",
            extra_body={"idempotency_key": "k" * MEGABYTE},
        )
    assert len(info.value.response.content) < 2000


def test_an_oversized_input_file_id_is_400(openai_client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="input_file_id") as info:
        openai_client.batches.create(input_file_id="file-" + "x" * MEGABYTE, endpoint=CHAT, completion_window="24h")
    assert len(info.value.response.content) < 2000


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ('"metadata": {"k": "\\ud800"}', "metadata"),
        ('"metadata": {"\\udfff": "v"}', "metadata"),
        ('"idempotency_key": "key-\\ud800"', "idempotency_key"),
        ('"idempotency_key": "key-\\u0000"', "idempotency_key"),
    ],
)
def test_lone_surrogates_and_control_characters_are_400(
    stack: ServerProcess, batch_file: str, field: str, param: str
) -> None:
    body = f'{{"input_file_id": "{batch_file}", "endpoint": "{CHAT}", "completion_window": "24h", {field}}}'
    assert_refused(post_raw_json(stack, body), 400, param)


@pytest.mark.parametrize("input_file_id", ["file-\\ud800", "file-\\u0000", "file with spaces"])
def test_malformed_input_file_ids_are_400(stack: ServerProcess, input_file_id: str) -> None:
    body = f'{{"input_file_id": "{input_file_id}", "endpoint": "{CHAT}", "completion_window": "24h"}}'
    assert_refused(post_raw_json(stack, body), 400, "input_file_id")


@pytest.mark.parametrize(
    "batch_id", ["x" * 10_000, "batch_%00", "batch_%ED%A0%80", "batch_%FF", "batch_%20x", "batch_" + "%00" * 3000]
)
def test_retrieve_and_cancel_of_ids_that_cannot_be_ours_are_404(stack: ServerProcess, batch_id: str) -> None:
    assert_refused(httpx.get(f"{stack.url}/v1/batches/{batch_id}", timeout=60), 404)
    assert_refused(httpx.post(f"{stack.url}/v1/batches/{batch_id}/cancel", timeout=60), 404)


def test_retrieve_and_cancel_of_a_long_id_through_the_sdk_are_404(openai_client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.retrieve("batch_" + "0" * 10_000)
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.cancel("batch_" + "0" * 10_000)


@pytest.mark.parametrize("after", ["x" * 10_000, "batch_%00", "batch_%ED%A0%80"])
def test_list_after_a_malformed_cursor_is_400(stack: ServerProcess, after: str) -> None:
    assert_refused(httpx.get(f"{stack.url}/v1/batches?after={after}", timeout=60), 400, "after")


def test_list_after_a_10_kb_cursor_through_the_sdk_is_400(openai_client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="after"):
        openai_client.batches.list(after="batch_" + "0" * 10_000)


@pytest.mark.parametrize("limit", ["0", "101", "-1"])
def test_list_limit_out_of_range_is_400(stack: ServerProcess, limit: str) -> None:
    assert_refused(httpx.get(f"{stack.url}/v1/batches?limit={limit}", timeout=60), 400, "limit")


def test_list_limit_that_is_no_number_is_a_client_error(stack: ServerProcess) -> None:
    response = httpx.get(f"{stack.url}/v1/batches?limit=" + "9" * 5000, timeout=60)
    assert 400 <= response.status_code < 500, response.text[:500]


def test_a_file_uploaded_for_another_purpose_is_400_at_create(openai_client: OpenAI) -> None:
    content = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}'
    file_id = openai_client.files.create(file=("input.jsonl", content), purpose="assistants").id
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert (info.value.param, info.value.code) == ("input_file_id", "invalid_request")
    assert f"The input file {file_id} has purpose 'assistants'" in info.value.message


def test_the_server_still_serves_batches_after_all_that(openai_client: OpenAI, batch_file: str) -> None:
    batch = openai_client.batches.create(input_file_id=batch_file, endpoint=CHAT, completion_window="24h")
    assert wait_for_batch(openai_client, batch.id).status == "completed"


# --- the access policy's `create` ------------------------------------------------------------------

# Bob's team may not create batches; otherwise the stack's default policy, written out.
ACCESS_POLICY = (
    "    - forbid: {actions: [create], resource: 'batch::*'}\n"
    "      when: user with blue in teams\n"
    "      description: the blue team may not create batches\n"
) + OWNER_RULES


@pytest.fixture(scope="module")
def policy_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    """A stack with authentication (tokens of test_multi_user) and ACCESS_POLICY."""
    with token_endpoint(USERS) as auth_url:
        run_yaml = run_yaml_with_access_policy(run_dir, auth_url, ACCESS_POLICY)
        env = {"BATCHES_KV_NAMESPACE": f"batches-{uuid.uuid4().hex}"}
        state = run_dir / f"policy-state-{uuid.uuid4().hex[:6]}"
        server = start_stack(run_dir, state, f"{standin_server.url}/v1", env, run_yaml=run_yaml)
        try:
            warm_up(server, headers={"Authorization": "Bearer alice-token"})
            yield server
        finally:
            server.stop()


def client_of(stack: ServerProcess, token: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=60)


def test_a_user_the_access_policy_forbids_to_create_batches_gets_403(policy_stack: ServerProcess) -> None:
    alice, bob = client_of(policy_stack, "alice-token"), client_of(policy_stack, "bob-token")
    bobs_file = upload_jsonl(bob, chat_lines(1))
    with pytest.raises(openai.PermissionDeniedError, match="create"):
        bob.batches.create(input_file_id=bobs_file, endpoint=CHAT, completion_window="24h")
    assert bob.batches.list().data == []  # nothing was stored
    alices_file = upload_jsonl(alice, chat_lines(1))
    allowed = alice.batches.create(input_file_id=alices_file, endpoint=CHAT, completion_window="24h")
    assert wait_for_batch(alice, allowed.id).status == "completed"
