"""Create, retrieve, cancel and list through a real stack with the OpenAI SDK."""

import openai
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, upload_jsonl, wait_for_batch
from tools.harness import StandInControl


def test_a_batch_runs_to_completion_with_openai_shaped_results(openai_client: OpenAI) -> None:
    lines = chat_lines(5)
    lines.append({**chat_lines(1, suffix=" [[status:400]]")[0], "custom_id": "refused"})
    created = create_chat_batch(openai_client, lines, metadata={"job": "nightly"})
    assert created.id.startswith("batch_")
    assert created.status == "validating"
    assert created.expires_at == created.created_at + 24 * 3600
    assert created.metadata == {"job": "nightly"}

    batch = wait_for_batch(openai_client, created.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 5, 1)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    output = read_result_file(openai_client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == [f"req-{i}" for i in range(5)]
    for line in output:
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert isinstance(body, dict)
        assert body["object"] == "chat.completion"
        question = line["custom_id"].replace("req-", "question ")
        assert question in body["choices"][0]["message"]["content"]

    [error] = read_result_file(openai_client, batch.error_file_id)
    assert error["custom_id"] == "refused"
    assert error["response"]["status_code"] == 400
    assert "Forced status 400" in error["response"]["body"]["error"]["message"]
    output_file = openai_client.files.retrieve(batch.output_file_id)
    assert output_file.filename == f"{batch.id}_output.jsonl"
    assert output_file.purpose == "batch"


def test_a_file_with_bad_lines_fails_validation(openai_client: OpenAI) -> None:
    lines = chat_lines(2)
    lines[1]["url"] = "/v1/embeddings"
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, lines).id)
    assert batch.status == "failed"
    assert batch.failed_at is not None
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("invalid_url", 2, "url")]


def test_an_unknown_model_fails_validation(openai_client: OpenAI) -> None:
    lines = chat_lines(2)
    lines[0]["body"]["model"] = "local/no-such-model"
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, lines).id)
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("model_not_found", 1)]


def test_a_missing_input_file_fails_validation(openai_client: OpenAI) -> None:
    created = openai_client.batches.create(
        input_file_id="file-does-not-exist", endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(openai_client, created.id)
    assert batch.status == "failed"
    assert batch.errors.data[0].param == "input_file_id"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
    ],
)
def test_invalid_create_parameters_are_400_naming_the_param(openai_client: OpenAI, options: dict, param: str) -> None:
    file_id = upload_jsonl(openai_client, chat_lines(1))
    arguments = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **options}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.batches.create(**arguments)
    assert param in str(info.value)
    # completion_window is refused by the stack's own validation of the body, before the provider runs
    assert (info.value.param, info.value.type, info.value.code) == (param, "invalid_request_error", "invalid_value")


def test_unknown_batch_is_404_for_retrieve_and_cancel(openai_client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.retrieve("batch_00000000000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.cancel("batch_00000000000000000000000000000000")


def test_cancel_of_a_finished_batch_is_409(openai_client: OpenAI) -> None:
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, chat_lines(1)).id)
    assert batch.status == "completed"
    with pytest.raises(openai.ConflictError, match="completed"):
        openai_client.batches.cancel(batch.id)


def test_cancel_mid_run_keeps_the_partial_output(openai_client: OpenAI, standin: StandInControl) -> None:
    standin.configure(latency_mean=0.2)
    created = create_chat_batch(openai_client, chat_lines(200))
    running = wait_for_batch(openai_client, created.id, until={"in_progress"})
    assert running.in_progress_at is not None
    wait_until_some_completed(openai_client, created.id)
    cancelling = openai_client.batches.cancel(created.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    batch = wait_for_batch(openai_client, created.id)
    assert batch.status == "cancelled"
    assert openai_client.batches.cancel(created.id).status == "cancelled"  # a repeat changes nothing
    output = read_result_file(openai_client, batch.output_file_id)
    assert 0 < len(output) < 200
    assert len(output) == batch.request_counts.completed
    assert batch.request_counts.total == 200


def wait_until_some_completed(client: OpenAI, batch_id: str) -> None:
    for _ in range(100):
        if client.batches.retrieve(batch_id).request_counts.completed > 0:
            return
        import time

        time.sleep(0.1)
    raise AssertionError("no request completed")


def test_list_pages_newest_first_with_a_cursor(openai_client: OpenAI) -> None:
    file_id = upload_jsonl(openai_client, chat_lines(1))
    mine = [
        openai_client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(5)
    ]
    first = openai_client.batches.list(limit=2)
    assert [b.id for b in first.data] == mine[::-1][:2]
    assert first.has_more is True
    assert (first.first_id, first.last_id) == (mine[4], mine[3])
    second = openai_client.batches.list(limit=2, after=first.last_id)
    assert [b.id for b in second.data] == [mine[2], mine[1]]
    walked = [b.id for b in openai_client.batches.list(limit=3)]  # the SDK follows the cursor itself
    assert walked[:5] == mine[::-1]
    assert len(walked) == len(set(walked))


@pytest.mark.parametrize("limit", [0, 101])
def test_list_limit_out_of_range_is_400(openai_client: OpenAI, limit: int) -> None:
    with pytest.raises(openai.BadRequestError, match="limit"):
        openai_client.batches.list(limit=limit)
