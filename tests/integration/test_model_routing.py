"""Batch requests keep the stack's model semantics while their lookups are reused (stack_routing.py):
each request goes to the provider serving its model, and a model the access policy hides from a
user is hidden in their batches too, whoever's lookups the provider holds.

A model removed while a batch runs is not here: neither llama-stack 0.7 nor OGX 1.x serves model
registration over HTTP (their registry refreshes from providers every 300 s); the unit tests of
stack_routing.py show a removal seen once the kept answer is `model_lookup_seconds` old."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, wait_for_batch
from tools.harness import (
    OWNER_RULES,
    RUN_YAML,
    ServerProcess,
    StandInControl,
    _run_yaml_copy,
    run_yaml_with_access_policy,
    run_yaml_without,
    start_stack,
    start_standin,
    token_endpoint,
    warm_up,
)
from tools.standin_model_server import DEFAULT_MODELS

USERS = {  # disjoint attributes
    "alice-token": {"principal": "alice", "attributes": {"teams": ["red"]}},
    "bob-token": {"principal": "bob", "attributes": {"teams": ["blue"]}},
}
# The blue team may not read the model local/m-secret; otherwise the stack's default rules.
ACCESS_POLICY = (
    "    - forbid: {actions: [read], resource: 'model::local/m-secret'}\n      when: user with blue in teams\n"
) + OWNER_RULES
LOOKUP_SECONDS = 0.5
EXTRA_MODELS = (("m-secret", "local", "m-secret"), ("o-chat", "other", "o-chat"))  # model, provider, provider's id


@dataclass
class RoutingStack:
    server: ServerProcess
    main: StandInControl  # serves m-chat and m-secret (provider `local`)
    other: StandInControl  # serves o-chat only (provider `other`)

    def client(self, token: str) -> OpenAI:
        return OpenAI(base_url=f"{self.server.url}/v1", api_key=token, max_retries=0, timeout=60)


def with_other_provider(run_yaml: Path, other_url: str) -> Path:
    """`run_yaml` with a second inference provider, `other`, and the models local/m-secret and other/o-chat."""

    def add(config: dict[str, Any]) -> None:
        local = config["providers"]["inference"][0]
        config["providers"]["inference"].append(
            {**local, "provider_id": "other", "config": {**local["config"], "base_url": other_url}}
        )
        for model_id, provider_id, provider_model_id in EXTRA_MODELS:
            config["registered_resources"]["models"].append(
                {"model_id": model_id, "provider_id": provider_id, "provider_model_id": provider_model_id}
            )

    return _run_yaml_copy(run_yaml, run_yaml.with_name(f"{run_yaml.stem}-other.yaml"), add)


@pytest.fixture(scope="module")
def routing_stack(run_dir: Path) -> Iterator[RoutingStack]:
    logs = run_dir / f"routing-{uuid.uuid4().hex[:6]}"
    for name in ("main", "other"):
        (logs / name).mkdir(parents=True)
    main = start_standin(logs / "main", models=",".join((*DEFAULT_MODELS, "m-secret")))
    other = start_standin(logs / "other", models="o-chat")
    try:
        with token_endpoint(USERS) as auth_url:
            # Without vector stores, which OGX refuses to start with an access policy but no store of their own.
            base = run_yaml_without(logs, {"responses", "vector_io", "tool_runtime"}, base=RUN_YAML)
            with_policy = run_yaml_with_access_policy(logs, auth_url, ACCESS_POLICY, base=base)
            run_yaml = with_other_provider(with_policy, f"{other.url}/v1")
            env = {"BATCHES_MODEL_LOOKUP_SECONDS": str(LOOKUP_SECONDS)}
            server = start_stack(logs, logs / "state", f"{main.url}/v1", env, run_yaml=run_yaml)
            try:
                warm_up(server, headers={"Authorization": "Bearer alice-token"})
                yield RoutingStack(server, StandInControl(main.url), StandInControl(other.url))
            finally:
                server.stop()
    finally:
        main.stop()
        other.stop()


def test_each_request_goes_to_the_provider_serving_its_model(routing_stack: RoutingStack) -> None:
    alice = routing_stack.client("alice-token")
    lines = chat_lines(40, tag="mixed")
    for n, line in enumerate(lines):
        line["body"]["model"] = "local/m-chat" if n % 2 == 0 else "other/o-chat"
    batch = wait_for_batch(alice, create_chat_batch(alice, lines).id)
    assert batch.status == "completed" and batch.request_counts.completed == 40, batch.errors
    outputs = read_result_file(alice, batch.output_file_id)
    results = {line["custom_id"]: line["response"]["body"]["model"] for line in outputs}
    assert results == {line["custom_id"]: line["body"]["model"] for line in lines}
    # The stand-in of `other` knows only o-chat: it answered exactly the other half.
    assert routing_stack.other.stats()["total"] == 20


def test_a_model_the_policy_hides_from_a_user_is_hidden_in_their_batches(routing_stack: RoutingStack) -> None:
    alice, bob = routing_stack.client("alice-token"), routing_stack.client("bob-token")
    # Alice's batch first, so that the provider holds her lookups of the model when bob's arrives.
    mine = wait_for_batch(alice, create_chat_batch(alice, chat_lines(10, tag="alice", model="local/m-secret")).id)
    assert mine.status == "completed" and mine.request_counts.completed == 10, mine.errors
    before = routing_stack.main.stats()["by_prompt"]
    theirs = wait_for_batch(bob, create_chat_batch(bob, chat_lines(10, tag="bob-secret", model="local/m-secret")).id)
    assert theirs.status == "failed" and theirs.errors is not None
    assert any("local/m-secret" in (error.message or "") for error in theirs.errors.data or [])
    sent_for_bob = [p for p in routing_stack.main.stats()["by_prompt"] if "bob-secret" in p and p not in before]
    assert sent_for_bob == []  # nothing of bob's reached the model
