"""A struggling backend: failures injected by the stand-in, counted at the stand-in."""

import uuid

from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, wait_for_batch
from tests.integration.conftest import RESILIENCE_ATTEMPTS
from tools.harness import ServerProcess, StandInControl

# The stack's OpenAI-compatible provider retries twice on its own (the openai client's default):
# one attempt of ours is up to three requests at the backend for a transient failure.
BACKEND_REQUESTS_PER_ATTEMPT = 3


def prompt(line: dict) -> str:
    return line["body"]["messages"][0]["content"]


def test_transient_failures_do_not_reach_the_results(openai_client: OpenAI, standin: StandInControl) -> None:
    standin.configure(fail_503=0.3, fail_429=0.1, retry_after=0.1)
    lines = chat_lines(200)
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, lines).id, timeout=180)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (200, 0)
    assert batch.error_file_id is None
    received = standin.stats()["by_prompt"]
    sent = sum(received[prompt(line)] for line in lines)
    assert sent > 200  # failures were injected, and retried
    print(f"\n30% 503 + 10% 429: {sent} backend requests for 200 batch requests")


def test_a_permanent_failure_is_tried_exactly_once(openai_client: OpenAI, standin: StandInControl) -> None:
    refused = chat_lines(5, suffix=" [[status:400]]")
    lines = refused + [{**line, "custom_id": f"ok-{n}"} for n, line in enumerate(chat_lines(5))]
    batch = wait_for_batch(openai_client, create_chat_batch(openai_client, lines).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 5)
    received = standin.stats()["by_prompt"]
    assert [received[prompt(line)] for line in lines[:5]] == [1] * 5
    errors = read_result_file(openai_client, batch.error_file_id)
    assert {line["response"]["status_code"] for line in errors} == {400}


def test_a_stalled_attempt_is_cut_off_and_retried(impatient_stack: ServerProcess, standin: StandInControl) -> None:
    client = OpenAI(base_url=f"{impatient_stack.url}/v1", api_key="none", max_retries=0)
    lines = chat_lines(3, suffix=" [[stall-once:30]]")
    batch = wait_for_batch(client, create_chat_batch(client, lines).id, timeout=30)
    assert (batch.status, batch.request_counts.completed) == ("completed", 3)
    received = standin.stats()["by_prompt"]
    assert [received[prompt(line)] for line in lines] == [2, 2, 2]


def test_retries_run_out_with_the_documented_error_lines(
    impatient_stack: ServerProcess, standin: StandInControl
) -> None:
    client = OpenAI(base_url=f"{impatient_stack.url}/v1", api_key="none", max_retries=0)
    tag = uuid.uuid4().hex[:8]
    unavailable = chat_lines(2, tag=tag, suffix=" [[status:503]]")
    stalled = [{**line, "custom_id": f"stalled-{n}"} for n, line in enumerate(chat_lines(2, suffix=" [[sleep:30]]"))]
    batch = wait_for_batch(client, create_chat_batch(client, unavailable + stalled).id, timeout=90)
    assert (batch.status, batch.request_counts.failed) == ("completed", 4)
    errors = {line["custom_id"]: line for line in read_result_file(client, batch.error_file_id)}

    for line in unavailable:  # an HTTP answer: its last status and error body
        error_line = errors[line["custom_id"]]
        assert error_line["error"] is None
        assert error_line["response"]["status_code"] == 503
        assert error_line["response"]["body"]["error"]["message"] == "Forced status 503 (marker)."
    received = standin.stats()["by_prompt"]
    assert [received[prompt(line)] for line in unavailable] == [RESILIENCE_ATTEMPTS * BACKEND_REQUESTS_PER_ATTEMPT] * 2

    for n in range(2):  # no HTTP answer: an error object with a code
        error_line = errors[f"stalled-{n}"]
        assert error_line["response"] is None
        assert error_line["error"]["code"] == "timeout"
