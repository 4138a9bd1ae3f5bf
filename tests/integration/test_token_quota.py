"""Per-user quotas in estimated input tokens (`max_enqueued_tokens_per_user`) through real stacks: a
batch past its owner's limit ends `failed` with `token_limit_exceeded`, tokens come back as requests
finish, the count survives a crash, and two replicas validating at once cannot both pass."""

import concurrent.futures
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types import Batch

from llama_stack_provider_batches.requests.token_estimates import estimate_tokens, text_counter
from tests.integration.batching import chat_lines, create_chat_batch, wait_for_batch
from tools.harness import (
    REPLICAS_RUN_YAML,
    ServerProcess,
    StandInControl,
    fresh_replica_set_env,
    run_yaml_with_auth,
    server_up,
    start_stack,
    token_endpoint,
    warm_up,
)
from tools.tiktoken_cache import ensure_cache

USERS = {  # disjoint attributes: each user sees only their own batches, and has a quota of their own
    "alice-token": {"principal": "alice", "attributes": {"teams": ["red"]}},
    "bob-token": {"principal": "bob", "attributes": {"teams": ["blue"]}},
}
LIMIT = 400  # about 30 of these tests' chat lines
WINDOW = 4
LATENCY = 0.25  # a 25-line batch runs for about 1.6 s at a window of 4
SLOW = 3.0  # while a batch must still be running when another is checked, however loaded the machine


def lines_of(tokens: int, tag: str) -> list[dict[str, Any]]:
    """Chat lines whose estimate is just over `tokens` (the estimator of the provider, as it counts them)."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ensure_cache()))
    count = text_counter()
    lines: list[dict[str, Any]] = []
    total = 0
    while total <= tokens:
        line = chat_lines(len(lines) + 1, tag=tag)[-1]
        total += estimate_tokens("/v1/chat/completions", line["body"], count)
        lines.append(line)
    return lines


def estimate_of(batch: Batch) -> int:
    return int((batch.model_extra or {})["estimated_input_tokens"])


def ended(client: OpenAI, batch: Batch, timeout: float = 60) -> Batch:
    return wait_for_batch(client, batch.id, timeout=timeout)


def wait_for_completed(client: OpenAI, batch_id: str, completed: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = client.batches.retrieve(batch_id).request_counts
        if counts and counts.completed >= completed:
            return
        time.sleep(0.05)
    raise AssertionError(f"{batch_id} did not reach {completed} completed requests in {timeout} s")


def assert_over_limit(batch: Batch) -> None:
    assert batch.status == "failed", batch
    assert batch.errors and batch.errors.data and len(batch.errors.data) == 1
    error = batch.errors.data[0]
    assert error.code == "token_limit_exceeded"
    assert error.message and "local/m-chat" in error.message and f"{LIMIT:,}" in error.message


def quota_env(**more: str) -> dict[str, str]:
    return {
        "BATCHES_KV_NAMESPACE": f"batches-{uuid.uuid4().hex}",
        "BATCHES_MAX_ENQUEUED_TOKENS_PER_USER": str(LIMIT),
        "BATCHES_MAX_CONCURRENT_REQUESTS": str(WINDOW),
        **more,
    }


@pytest.fixture(scope="module")
def users_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    with token_endpoint(USERS) as auth_url:
        state = run_dir / f"quota-state-{uuid.uuid4().hex[:6]}"
        run_yaml = run_yaml_with_auth(run_dir, auth_url)
        server = start_stack(run_dir, state, f"{standin_server.url}/v1", quota_env(), run_yaml=run_yaml)
        warm_up(server, headers={"Authorization": "Bearer alice-token"})
        yield server
        server.stop()


def client(stack: ServerProcess, token: str = "none") -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=60)


def test_a_batch_past_its_owners_limit_fails_and_passes_once_the_first_has_finished(
    users_stack: ServerProcess, standin: StandInControl
) -> None:
    standin.configure(latency_mean=SLOW)  # the first batch still runs while the second is checked
    alice, bob = client(users_stack, "alice-token"), client(users_stack, "bob-token")
    first = create_chat_batch(alice, lines_of(240, "first"))
    running = wait_for_batch(alice, first.id, until={"in_progress"})
    assert 240 < estimate_of(running) < 280
    second_lines = lines_of(200, "second")
    refused = ended(alice, create_chat_batch(alice, second_lines))
    assert alice.batches.retrieve(first.id).status == "in_progress"
    assert_over_limit(refused)
    assert 200 < estimate_of(refused) < 240
    standin.configure(latency_mean=LATENCY)
    assert ended(bob, create_chat_batch(bob, second_lines)).status == "completed"  # bob's quota is his own
    assert ended(alice, first).status == "completed"
    assert ended(alice, create_chat_batch(alice, second_lines)).status == "completed"


def test_tokens_come_back_as_requests_finish(users_stack: ServerProcess, standin: StandInControl) -> None:
    standin.configure(latency_mean=LATENCY)
    alice = client(users_stack, "alice-token")
    first_lines = lines_of(280, "long")
    done_first = len(first_lines) * 2 // 3
    for line in first_lines[done_first:]:  # the last third takes 2 s each: still running while the second is checked
        line["body"]["messages"][0]["content"] += " [[sleep:2]]"
    first = create_chat_batch(alice, first_lines)
    wait_for_completed(alice, first.id, done_first)  # about a third of its tokens left
    second = create_chat_batch(alice, lines_of(200, "later"))
    second_running = wait_for_batch(alice, second.id, until={"in_progress", "failed"})
    first_meanwhile = alice.batches.retrieve(first.id)
    assert second_running.status == "in_progress", second_running.errors
    assert first_meanwhile.status == "in_progress"  # the first's tokens were released request by request
    assert ended(alice, first).status == ended(alice, second).status == "completed"


def test_the_count_survives_a_crash_and_is_back_to_zero_once_the_batch_ends(
    run_dir: Path, standin_server: ServerProcess, standin: StandInControl
) -> None:
    state = run_dir / f"quota-crash-{uuid.uuid4().hex[:6]}"
    env = quota_env(BATCHES_LEASE_SECONDS="3")
    stack = start_stack(run_dir, state, f"{standin_server.url}/v1", env)
    try:
        warm_up(stack)
        # A slow model from its start: most of the first batch's tokens are still waiting when the
        # server is killed and when the next batch is checked after the restart, however loaded the machine.
        standin.configure(latency_mean=4 * LATENCY)
        first = create_chat_batch(client(stack), lines_of(380, "crash"))
        wait_for_completed(client(stack), first.id, 1)
        standin.configure(latency_mean=SLOW)
        stack.stop(signal.SIGKILL)
        stack = start_stack(run_dir, state, f"{standin_server.url}/v1", env)
        warm_up(stack)
        assert_over_limit(ended(client(stack), create_chat_batch(client(stack), lines_of(200, "blocked"))))
        standin.configure(latency_mean=LATENCY / 5)
        assert ended(client(stack), first).status == "completed"
        # Everything the first batch held is free again: a batch of nearly the whole limit passes.
        assert ended(client(stack), create_chat_batch(client(stack), lines_of(380, "whole"))).status == "completed"
    finally:
        stack.stop()


def test_two_replicas_validating_at_once_cannot_both_pass(
    run_dir: Path, standin_server: ServerProcess, standin: StandInControl
) -> None:
    if not server_up(5432):
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    standin.configure(latency_mean=LATENCY)
    env = fresh_replica_set_env(run_dir, **quota_env())
    replicas = []
    try:
        for _ in range(2):
            state = run_dir / f"quota-replica-{uuid.uuid4().hex[:6]}"
            replicas.append(start_stack(run_dir, state, f"{standin_server.url}/v1", env, run_yaml=REPLICAS_RUN_YAML))
            warm_up(replicas[-1])
        clients = [client(replica) for replica in replicas]
        inputs = [lines_of(240, f"race{n}") for n in range(2)]
        standin.configure(latency_mean=SLOW)  # neither can end before the other is checked
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            batches = list(pool.map(create_chat_batch, clients, inputs))
        for c, b in zip(clients, batches, strict=True):
            wait_for_batch(c, b.id, until={"in_progress", "failed"})
        standin.configure(latency_mean=LATENCY)
        outcomes = sorted((ended(c, b) for c, b in zip(clients, batches, strict=True)), key=lambda b: b.status)
        assert [b.status for b in outcomes] == ["completed", "failed"]
        assert_over_limit(outcomes[1])
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)
