"""Fair scheduling through a real stack with authentication on: a small batch created behind a big
one of another user does not wait for it, and per-user limits answer HTTP 429 naming the limit."""

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, record, wait_for_batch
from tools.harness import ServerProcess, StandInControl, run_yaml_with_auth, start_stack, token_endpoint, warm_up

USERS = {  # disjoint attributes: the stack's default policy then lets each see only their own
    "alice-token": {"principal": "alice", "attributes": {"teams": ["red"]}},
    "bob-token": {"principal": "bob", "attributes": {"teams": ["blue"]}},
}
MAX_ACTIVE_BATCHES = 2
MAX_QUEUED_REQUESTS = 1500
BIG, SMALL = 600, 10
LATENCY = 0.1


@pytest.fixture(scope="module")
def shared_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    with token_endpoint(USERS) as auth_url:
        env = {
            "BATCHES_KV_NAMESPACE": f"batches-{uuid.uuid4().hex}",
            "BATCHES_MAX_ACTIVE_BATCHES_PER_USER": str(MAX_ACTIVE_BATCHES),
            "BATCHES_MAX_QUEUED_REQUESTS_PER_USER": str(MAX_QUEUED_REQUESTS),
        }
        state = run_dir / f"fair-state-{uuid.uuid4().hex[:6]}"
        run_yaml = run_yaml_with_auth(run_dir, auth_url)
        server = start_stack(run_dir, state, f"{standin_server.url}/v1", env, run_yaml=run_yaml)
        warm_up(server, headers={"Authorization": "Bearer alice-token"})
        yield server
        server.stop()


def error_message(error: openai.APIStatusError) -> str:
    return error.body["message"] if isinstance(error.body, dict) else str(error)


def client(stack: ServerProcess, token: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=60)


def test_a_small_batch_behind_another_users_big_one_finishes_first(
    shared_stack: ServerProcess, standin: StandInControl, run_dir: Path
) -> None:
    standin.configure(latency_mean=LATENCY)
    alice, bob = client(shared_stack, "alice-token"), client(shared_stack, "bob-token")
    big = create_chat_batch(alice, chat_lines(BIG, tag="big"))
    while alice.batches.retrieve(big.id).request_counts.completed < 20:  # alice's batch is well under way
        time.sleep(0.1)
    created = time.monotonic()
    small = create_chat_batch(bob, chat_lines(SMALL, tag="small"))
    started = None
    while (batch := bob.batches.retrieve(small.id)).status not in ("completed", "failed", "expired", "cancelled"):
        if started is None and batch.request_counts and batch.request_counts.completed:
            started = time.monotonic() - created
        time.sleep(0.05)
    finished = time.monotonic() - created
    big_when_small_ended = alice.batches.retrieve(big.id)
    done = wait_for_batch(alice, big.id, timeout=120)  # before asserting: the next test needs alice's slots
    assert batch.status == "completed" and batch.request_counts.completed == SMALL
    # The ordering, not a time: had bob's batch queued behind alice's, hers would have ended first.
    assert big_when_small_ended.status == "in_progress", "bob's batch waited for alice's"
    assert big_when_small_ended.request_counts.completed < BIG
    assert len(read_result_file(bob, batch.output_file_id)) == SMALL
    assert done.status == "completed" and done.request_counts.completed == BIG
    record(run_dir, "fairness.json", "small behind big", {"started_s": started, "completed_s": round(finished, 2)})


def test_a_user_beyond_the_unfinished_batch_limit_gets_429(
    shared_stack: ServerProcess, standin: StandInControl
) -> None:
    standin.configure(latency_mean=LATENCY)
    alice, bob = client(shared_stack, "alice-token"), client(shared_stack, "bob-token")
    running = [create_chat_batch(alice, chat_lines(300, tag=f"held{n}")) for n in range(MAX_ACTIVE_BATCHES)]
    with pytest.raises(openai.RateLimitError) as refused:
        create_chat_batch(alice, chat_lines(1))
    assert refused.value.status_code == 429
    message = error_message(refused.value)
    assert "max_active_batches_per_user" in message and refused.value.code == "rate_limit_exceeded"
    create_chat_batch(bob, chat_lines(1))  # another user is not limited by alice's batches
    for batch in running:
        assert alice.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    for batch in running:
        assert wait_for_batch(alice, batch.id, timeout=60).status == "cancelled"
    create_chat_batch(alice, chat_lines(1))  # finished batches do not count


def test_a_batch_beyond_the_queued_request_limit_gets_429(shared_stack: ServerProcess) -> None:
    bob = client(shared_stack, "bob-token")
    with pytest.raises(openai.RateLimitError) as refused:
        create_chat_batch(bob, chat_lines(MAX_QUEUED_REQUESTS + 1))
    message = error_message(refused.value)
    assert f"max_queued_requests_per_user: {MAX_QUEUED_REQUESTS}" in message
    assert wait_for_batch(bob, create_chat_batch(bob, chat_lines(5)).id).status == "completed"
