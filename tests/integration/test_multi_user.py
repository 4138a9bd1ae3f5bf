"""Two users on one stack with authentication on (the stack's `custom` provider, pointed at a small
token-to-user endpoint served here): batches, files, idempotency keys and webhook endpoints stay each
user's own, and each user's endpoints receive the events of that user's batches only."""

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, upload_jsonl, wait_for_batch
from tools.harness import ServerProcess, StandInControl, run_yaml_with_auth, start_stack, token_endpoint, warm_up
from tools.webhook_receiver import WebhookReceiver

USERS = {  # disjoint attributes: the stack's default policy then lets each see only their own
    "alice-token": {"principal": "alice", "attributes": {"teams": ["red"]}},
    "bob-token": {"principal": "bob", "attributes": {"teams": ["blue"]}},
}


# Bob's team may not use embeddings; everything else is open to everyone.
ROUTE_POLICY = (
    "    - forbid: {paths: /v1/embeddings}\n      when: user with blue in teams\n    - permit: {paths: '*'}\n"
)


@pytest.fixture(scope="module")
def auth_endpoint() -> Iterator[str]:
    with token_endpoint(USERS) as url:
        yield url


class AuthStack:
    """A stack with authentication, which a test may restart on the same state."""

    def __init__(self, run_dir: Path, model_url: str, auth_endpoint: str) -> None:
        self.run_dir = run_dir
        self.state = run_dir / f"auth-state-{uuid.uuid4().hex[:6]}"
        self.model_url = model_url
        self.run_yaml = run_yaml_with_auth(run_dir, auth_endpoint, ROUTE_POLICY)
        self.env = {"BATCHES_KV_NAMESPACE": f"batches-{uuid.uuid4().hex}", "BATCHES_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
        self.server: ServerProcess | None = None

    def start(self) -> None:
        self.server = start_stack(self.run_dir, self.state, self.model_url, self.env, run_yaml=self.run_yaml)
        warm_up(self.server, headers={"Authorization": "Bearer alice-token"})

    def client(self, token: str) -> OpenAI:
        assert self.server is not None
        return OpenAI(base_url=f"{self.server.url}/v1", api_key=token, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def auth_stack(run_dir: Path, standin_server: ServerProcess, auth_endpoint: str) -> Iterator[AuthStack]:
    stack = AuthStack(run_dir, f"{standin_server.url}/v1", auth_endpoint)
    stack.start()
    yield stack
    if stack.server is not None:
        stack.server.stop()


def test_an_unknown_token_is_refused(auth_stack: AuthStack) -> None:
    with pytest.raises(openai.AuthenticationError):
        auth_stack.client("nobody").batches.list()


def test_a_user_cannot_reach_another_users_batch(auth_stack: AuthStack) -> None:
    alice, bob = auth_stack.client("alice-token"), auth_stack.client("bob-token")
    batch = create_chat_batch(bob, chat_lines(2))
    with pytest.raises(openai.NotFoundError):
        alice.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        alice.batches.cancel(batch.id)
    assert batch.id not in [b.id for b in alice.batches.list(limit=100)]
    assert batch.id in [b.id for b in bob.batches.list(limit=100)]
    finished = wait_for_batch(bob, batch.id)
    assert finished.status == "completed"
    assert len(read_result_file(bob, finished.output_file_id)) == 2  # the owner reads the output...
    with pytest.raises(openai.NotFoundError):
        alice.files.content(finished.output_file_id)  # ...the other user cannot


def test_a_batch_over_another_users_file_fails_as_missing(auth_stack: AuthStack) -> None:
    alice, bob = auth_stack.client("alice-token"), auth_stack.client("bob-token")
    bobs_file = upload_jsonl(bob, chat_lines(1))
    batch = alice.batches.create(input_file_id=bobs_file, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for_batch(alice, batch.id)
    assert failed.status == "failed"
    assert [(e.code, e.param) for e in failed.errors.data] == [("invalid_request", "input_file_id")]
    assert failed.errors.data[0].message.startswith(f"Cannot find file '{bobs_file}'")  # OpenAI's words


def test_the_same_idempotency_key_gives_each_user_their_own_batch(auth_stack: AuthStack) -> None:
    alice, bob = auth_stack.client("alice-token"), auth_stack.client("bob-token")
    key = {"idempotency_key": f"shared-{uuid.uuid4().hex}"}
    for_alice = alice.batches.create(
        input_file_id=upload_jsonl(alice, chat_lines(1)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body=key,
    )
    for_bob = bob.batches.create(
        input_file_id=upload_jsonl(bob, chat_lines(1)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body=key,
    )
    assert for_alice.id != for_bob.id
    again = alice.batches.retrieve(for_alice.id)
    assert again.input_file_id == for_alice.input_file_id


RESUMED_REQUESTS = 300  # killed after 100: the rest runs after the restart


def test_a_resumed_batch_still_runs_as_its_creator(auth_stack: AuthStack, standin: StandInControl) -> None:
    standin.configure(latency_mean=0.05)
    bob = auth_stack.client("bob-token")
    lines = chat_lines(RESUMED_REQUESTS)
    batch = create_chat_batch(bob, lines)
    wait_for_batch(bob, batch.id, until={"in_progress"})
    while bob.batches.retrieve(batch.id).request_counts.completed < 100:
        time.sleep(0.05)
    auth_stack.server.stop(signal.SIGKILL)
    auth_stack.start()
    bob, alice = auth_stack.client("bob-token"), auth_stack.client("alice-token")
    finished = wait_for_batch(bob, batch.id, timeout=120)
    assert finished.status == "completed"
    assert finished.request_counts.completed == RESUMED_REQUESTS
    assert len(read_result_file(bob, finished.output_file_id)) == RESUMED_REQUESTS  # written as Bob: Bob reads it
    with pytest.raises(openai.NotFoundError):
        alice.files.content(finished.output_file_id)


def test_a_route_forbidden_to_a_user_is_forbidden_in_batches_too(auth_stack: AuthStack) -> None:
    alice, bob = auth_stack.client("alice-token"), auth_stack.client("bob-token")
    line = {
        "custom_id": "e",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "local/m-embed", "input": "x"},
    }
    with pytest.raises(openai.PermissionDeniedError):
        bob.embeddings.create(model="local/m-embed", input="x")  # the stack's own route policy
    with pytest.raises(openai.PermissionDeniedError):
        bob.batches.create(input_file_id=upload_jsonl(bob, [line]), endpoint="/v1/embeddings", completion_window="24h")
    allowed = alice.batches.create(
        input_file_id=upload_jsonl(alice, [line]), endpoint="/v1/embeddings", completion_window="24h"
    )
    assert wait_for_batch(alice, allowed.id).status == "completed"


def test_each_users_endpoints_get_their_own_batches_events_and_nobody_elses(auth_stack: AuthStack) -> None:
    alice, bob = auth_stack.client("alice-token"), auth_stack.client("bob-token")
    with WebhookReceiver() as alices_receiver, WebhookReceiver() as bobs_receiver:
        alices = alice.webhooks.create(name="a", url=alices_receiver.url, event_types=["batch.completed"])
        bobs = bob.webhooks.create(name="b", url=bobs_receiver.url, event_types=["batch.completed"])
        for attempt in (
            lambda: bob.webhooks.retrieve(alices.id),
            lambda: bob.webhooks.update(alices.id, name="mine now"),
            lambda: bob.webhooks.test(alices.id, event_type="batch.completed"),
            lambda: bob.webhooks.rotate_secret(alices.id),
            lambda: bob.webhooks.delete(alices.id),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert [e.id for e in bob.webhooks.list()] == [bobs.id]
        alices_batch = create_chat_batch(alice, chat_lines(2))
        bobs_batch = create_chat_batch(bob, chat_lines(2))
        for client, batch in ((alice, alices_batch), (bob, bobs_batch)):
            wait_for_batch(client, batch.id)
        alices_receiver.wait_for(1, accepted=True)
        bobs_receiver.wait_for(1, accepted=True)
        time.sleep(1.0)  # nothing more comes
        alice.webhooks.delete(alices.id)
        bob.webhooks.delete(bobs.id)
    assert [e.data.id for e in alices_receiver.events(alices.signing_secret)] == [alices_batch.id]
    assert [e.data.id for e in bobs_receiver.events(bobs.signing_secret)] == [bobs_batch.id]
