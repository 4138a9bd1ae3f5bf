"""Idempotent creation over the wire: OpenAI SDK (`extra_body`) and llama-stack-client (`idempotency_key=`)."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from llama_stack_client import ConflictError as StackConflictError
from llama_stack_client import LlamaStackClient
from openai import OpenAI

from tests.integration.batching import chat_lines, upload_jsonl, wait_for_batch
from tools.harness import ServerProcess, StandInControl

CHAT = "/v1/chat/completions"


def key() -> str:
    return f"key-{uuid.uuid4().hex}"


def create(client: OpenAI, file_id: str, idempotency_key: str | None, **options):
    extra = {"idempotency_key": idempotency_key} if idempotency_key else None
    return client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", extra_body=extra, **options
    )


def test_same_key_same_parameters_returns_the_same_batch(openai_client: OpenAI) -> None:
    file_id = upload_jsonl(openai_client, chat_lines(2))
    k = key()
    first = create(openai_client, file_id, k, metadata={"a": "1", "b": "2"})
    finished = wait_for_batch(openai_client, first.id)
    again = create(openai_client, file_id, k, metadata={"b": "2", "a": "1"})
    assert again.id == first.id
    assert again.created_at == first.created_at
    assert again.status == finished.status == "completed"


@pytest.mark.parametrize(
    "change",
    [{"metadata": {"a": "2"}}, {"metadata": None}, {"input_file_id": "other"}, {"endpoint": "/v1/embeddings"}],
)
def test_same_key_different_parameters_is_409(openai_client: OpenAI, change: dict) -> None:
    file_id = upload_jsonl(openai_client, chat_lines(1))
    k = key()
    original = create(openai_client, file_id, k, metadata={"a": "1"})
    arguments = {"input_file_id": file_id, "endpoint": CHAT, "metadata": {"a": "1"}, **change}
    if change.get("input_file_id") == "other":
        arguments["input_file_id"] = upload_jsonl(openai_client, chat_lines(1))
    if arguments["metadata"] is None:
        del arguments["metadata"]
    with pytest.raises(openai.ConflictError) as info:
        openai_client.batches.create(completion_window="24h", extra_body={"idempotency_key": k}, **arguments)
    assert info.value.status_code == 409
    assert f"Idempotency token '{k}' was previously used with different parameters" in str(info.value)
    stored = openai_client.batches.retrieve(original.id)
    assert (stored.input_file_id, stored.metadata) == (file_id, {"a": "1"})


def test_a_409_carries_its_fields_and_the_sdk_sends_it_once(stack: ServerProcess, openai_client: OpenAI) -> None:
    posts: list[str] = []

    def count(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path == "/v1/batches":
            posts.append(request.url.path)

    # The SDK's default retries are on: it retries a 409 unless the answer says not to.
    retrying = OpenAI(
        base_url=f"{stack.url}/v1", api_key="none", http_client=httpx.Client(event_hooks={"request": [count]})
    )
    file_id = upload_jsonl(openai_client, chat_lines(1))
    k = key()
    create(retrying, file_id, k)
    with pytest.raises(openai.ConflictError) as info:
        create(retrying, file_id, k, metadata={"changed": "yes"})
    assert len(posts) == 2  # one for the create, one for the conflict: no retries
    error = info.value
    assert (error.code, error.param, error.type) == (
        "idempotency_key_reused",
        "idempotency_key",
        "invalid_request_error",
    )
    assert error.response.headers["x-should-retry"] == "false"


def test_different_keys_and_no_key_make_new_batches(openai_client: OpenAI) -> None:
    file_id = upload_jsonl(openai_client, chat_lines(1))
    ids = {create(openai_client, file_id, key()).id, create(openai_client, file_id, key()).id}
    ids |= {create(openai_client, file_id, None).id, create(openai_client, file_id, None).id}
    assert len(ids) == 4


def test_concurrent_creates_with_one_key_make_one_batch_processed_once(
    openai_client: OpenAI, standin: StandInControl
) -> None:
    tag = uuid.uuid4().hex[:8]
    lines = chat_lines(3, tag=tag)
    file_id = upload_jsonl(openai_client, lines)
    k = key()
    with ThreadPoolExecutor(max_workers=25) as pool:
        batches = list(pool.map(lambda _: create(openai_client, file_id, k), range(50)))
    assert len({b.id for b in batches}) == 1
    assert len({b.created_at for b in batches}) == 1
    batch = wait_for_batch(openai_client, batches[0].id)
    assert batch.status == "completed"
    listed = [b.id for b in openai_client.batches.list(limit=100).data]
    assert listed.count(batch.id) == 1
    received = standin.stats()["by_prompt"]
    assert [received.get(line["body"]["messages"][0]["content"]) for line in lines] == [1, 1, 1]


def test_llama_stack_client_takes_the_key_as_an_argument(openai_client: OpenAI, stack_client: LlamaStackClient) -> None:
    file_id = upload_jsonl(openai_client, chat_lines(1))
    k = key()
    first = stack_client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", idempotency_key=k
    )
    again = stack_client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", idempotency_key=k
    )
    assert again.id == first.id
    with pytest.raises(StackConflictError):
        stack_client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h", idempotency_key=k, metadata={"x": "y"}
        )
    assert stack_client.batches.retrieve(first.id).id == first.id
    listed = stack_client.batches.list(limit=5)
    assert first.id in [b.id for b in listed.data]
    finished = wait_for_batch(openai_client, first.id)
    with pytest.raises(StackConflictError):
        stack_client.batches.cancel(finished.id)
