"""Batches belong to their creator: the stack's users and default access policy, applied to batches."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.domain.ownership import (
    Owner,
    RouteGuard,
    acting_as,
    carries_request_credentials,
    check_may_create,
    current_owner,
    may,
    scope_of,
)
from llama_stack_provider_batches.stack import (
    PROVIDER_DATA_VAR,
    STACK,
    AccessDeniedError,
    AccessRule,
    Action,
    BatchNotFoundError,
    RequestProviderDataContext,
    Scope,
    User,
    get_authenticated_user,
)
from llama_stack_provider_batches.stack import user as stack_user
from tests.unit.conftest import FakeFiles, ProviderFactory
from tests.unit.helpers import CHAT, chat_line, jsonl

ALICE = User("alice", {"teams": ["red"]})
BOB = User("bob", {"teams": ["blue"]})
CAROL = User("carol", {"teams": ["red"]})


@contextmanager
def signed_in(user: User) -> Iterator[None]:
    with RequestProviderDataContext(user=user):
        yield


def owner(user: User) -> Owner:
    return Owner(principal=user.principal, attributes=user.attributes)


def test_scopes_separate_principals_and_unowned_batches() -> None:
    assert scope_of(None) == "_"
    assert scope_of(owner(ALICE)) == scope_of(owner(ALICE)) != scope_of(owner(BOB))


def test_tenants_separate_owners_of_one_name() -> None:
    in_a, in_b = Owner(principal="alice", tenant_id="a"), Owner(principal="alice", tenant_id="b")
    assert len({scope_of(in_a), scope_of(in_b), scope_of(Owner(principal="alice"))}) == 3
    # Without tenants (llama-stack) a scope is what it always was: stored batches keep their scope.
    assert scope_of(Owner(principal="alice")) == scope_of(owner(ALICE))


@pytest.mark.skipif(STACK != "ogx", reason="only OGX users have a tenant")
def test_an_ogx_callers_tenant_is_the_owners_and_runs_with_the_batch() -> None:
    caller = stack_user("alice", {"teams": ["red"]}, tenant_id="acme")
    with signed_in(caller):
        found = current_owner()
    assert found is not None and found.tenant_id == "acme"
    assert found.as_user().tenant_id == "acme"
    with acting_as(found):
        assert get_authenticated_user().tenant_id == "acme"


def test_default_policy_owner_or_shared_attribute() -> None:
    with signed_in(ALICE):
        assert may([], Action.READ, "batch_1", owner(ALICE))
        assert may([], Action.READ, "batch_1", owner(CAROL))  # shares the team "red"
        assert not may([], Action.READ, "batch_1", owner(BOB))
    assert may([], Action.READ, "batch_1", owner(BOB))  # no user: authentication is off


def test_acting_as_restores_the_owner_only_when_no_user_is_set() -> None:
    with acting_as(owner(ALICE)):
        assert get_authenticated_user().principal == "alice"
    with signed_in(BOB), acting_as(owner(ALICE)):
        assert get_authenticated_user().principal == "bob"
    with acting_as(None):
        assert get_authenticated_user() is None


async def create_as(user: User, provider: BatchesService, files: FakeFiles, **options: Any):
    with signed_in(user):
        return await provider.create_batch(
            input_file_id=files.add(jsonl([chat_line("a")])), endpoint=CHAT, completion_window="24h", **options
        )


async def test_another_users_batch_is_indistinguishable_from_a_missing_one(
    provider: BatchesService, files: FakeFiles
) -> None:
    batch = await create_as(ALICE, provider, files)
    with signed_in(BOB):
        for call in (provider.retrieve_batch, provider.cancel_batch):
            with pytest.raises(BatchNotFoundError) as info:
                await call(batch.id)
            assert str(info.value) == str(BatchNotFoundError("batch_does_not_exist")).replace(
                "batch_does_not_exist", batch.id
            )
        assert (await provider.list_batches()).data == []
    with signed_in(CAROL):  # same team: the stack's default policy lets her read it
        assert (await provider.retrieve_batch(batch.id)).id == batch.id
    with signed_in(ALICE):
        assert [b.id for b in (await provider.list_batches()).data] == [batch.id]


async def test_idempotency_keys_do_not_collide_between_users(provider: BatchesService, files: FakeFiles) -> None:
    file_id = files.add(jsonl([chat_line("a")]))

    async def create(user: User, **options: Any):
        with signed_in(user):
            return await provider.create_batch(
                input_file_id=file_id, endpoint=CHAT, completion_window="24h", idempotency_key="nightly", **options
            )

    for_alice = await create(ALICE)
    for_bob = await create(BOB, metadata={"other": "parameters"})  # no 409: Alice's key is not Bob's
    assert for_alice.id != for_bob.id
    assert (await create(ALICE)).id == for_alice.id
    assert (await create(BOB, metadata={"other": "parameters"})).id == for_bob.id


async def test_background_work_runs_as_the_creator_also_after_a_restart(
    provider: BatchesService, files: FakeFiles
) -> None:
    batch = await create_as(ALICE, provider, files)
    await provider._runner.wait_idle()
    assert files.readers[-1] == "alice"
    # As after a restart: the batch is picked up outside any request.
    await provider._store.update(batch.id, lambda b: b.model_copy(update={"status": "validating"}))
    provider._runner.wake()  # the claim loop was started by alice's request, yet runs as nobody
    await provider._runner.wait_idle()
    assert files.readers[-1] == "alice"


def route_guard(tmp_path: Path) -> RouteGuard:
    config = tmp_path / "run.yaml"
    config.write_text(
        "server:\n  auth:\n    route_policy:\n"
        "    - forbid: {paths: /v1/embeddings}\n      when: user with blue in teams\n"
        "    - permit: {paths: '*'}\n"
    )
    return RouteGuard.from_stack_config(str(config))


async def test_a_route_policy_forbidding_an_endpoint_forbids_batches_for_it(
    tmp_path: Path, provider: BatchesService, files: FakeFiles
) -> None:
    provider._routes = route_guard(tmp_path)
    with signed_in(BOB), pytest.raises(AccessDeniedError):
        await provider.create_batch(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h")
    await create_as(BOB, provider, files)  # chat completions stay allowed
    with signed_in(ALICE):
        embeddings = await provider.create_batch(
            input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h"
        )
    assert embeddings.endpoint == "/v1/embeddings"


def test_without_a_stack_config_every_route_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_STACK_CONFIG", raising=False)
    with signed_in(BOB):
        assert RouteGuard.from_stack_config().allows("/v1/embeddings")


async def test_a_resumed_batch_never_runs_without_its_creators_credentials(
    make_provider: ProviderFactory, files: FakeFiles, inference: Any
) -> None:
    from tests.unit.helpers import read_lines, restarted, start_batch

    inference.stall_after(3)
    first = await make_provider(shutdown_grace_seconds=0.1)
    with RequestProviderDataContext({"openai_api_key": "sk-secret"}, user=ALICE):
        batch = await start_batch(first, files, 10)
    while len(inference.calls) < 4:
        await asyncio.sleep(0.01)
    await first.shutdown()
    stored = await first._store.get(batch.id)
    assert stored.request_credentials
    assert "sk-secret" not in stored.model_dump_json()

    calls_before_restart = len(inference.calls)
    second = await restarted(make_provider)  # runs the batch outside any request
    with signed_in(ALICE):
        finished = await second.retrieve_batch(batch.id)
    assert finished.status == "completed"
    assert len(inference.calls) == calls_before_restart  # nothing ran under the server's own credentials
    errors = read_lines(files, finished.error_file_id)
    assert len(errors) == 7 and {line["error"]["code"] for line in errors} == {"credentials_unavailable"}
    assert len(read_lines(files, finished.output_file_id)) == 3
    await second.shutdown()


@pytest.mark.parametrize(
    "provider_data",
    [
        {"openai_api_key": "sk-secret"},
        {"vllm_api_token": "t"},
        {"aws_secret_access_key": "s", "region": "eu"},
        {"db_PASSWORD": "p"},
        {"gcp_credentials": "c"},
        {"Authorization": "Bearer x"},
    ],
)
def test_real_credentials_in_provider_data_count(provider_data: dict[str, Any]) -> None:
    with RequestProviderDataContext(provider_data, user=ALICE):
        assert carries_request_credentials()


@pytest.mark.parametrize(
    "provider_data",
    [
        None,
        {},
        {"foo": "bar"},
        {"openai_api_key": ""},
        {"openai_api_key": "   "},
        {"openai_api_key": None},
        {"api_key": 123},
        {"api_key": {"nested": "x"}},
        {"model": "m", "temperature": "0.5"},
    ],
)
def test_provider_data_without_a_credential_does_not_count(provider_data: dict[str, Any] | None) -> None:
    with RequestProviderDataContext(provider_data, user=ALICE):  # the stack's __authenticated_user is no credential
        assert not carries_request_credentials()
    with RequestProviderDataContext(provider_data):
        assert not carries_request_credentials()


def test_provider_data_that_is_not_an_object_does_not_count() -> None:
    token = PROVIDER_DATA_VAR.set(["openai_api_key", "sk"])  # type: ignore[arg-type]  # the header may hold any JSON
    try:
        assert not carries_request_credentials()
    finally:
        PROVIDER_DATA_VAR.reset(token)


async def test_a_batch_created_without_real_credentials_is_not_pinned_to_this_server(
    provider: BatchesService, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider._runner, "start", lambda: None)
    with RequestProviderDataContext({"foo": "bar"}, user=ALICE):
        plain = await provider.create_batch(
            input_file_id=files.add(jsonl([chat_line("a")])), endpoint=CHAT, completion_window="24h"
        )
    with RequestProviderDataContext({"openai_api_key": "sk-secret"}, user=ALICE):
        keyed = await provider.create_batch(
            input_file_id=files.add(jsonl([chat_line("a")])), endpoint=CHAT, completion_window="24h"
        )
    assert not (await provider._store.get(plain.id)).request_credentials
    assert (await provider._store.get(keyed.id)).request_credentials


def test_create_is_asked_of_the_policy_for_an_unowned_batch_resource() -> None:
    policy = [
        AccessRule(forbid=Scope(actions=[Action.CREATE], resource="batch::*"), when="user with blue in teams"),
        AccessRule(permit=Scope(actions=list(Action)), when="resource is unowned"),
    ]
    with signed_in(ALICE):
        check_may_create(policy, "batch_1")
        check_may_create([], "batch_1")  # the default policy lets everyone create
    with signed_in(BOB), pytest.raises(AccessDeniedError, match="batch::batch_1"):
        check_may_create(policy, "batch_1")
    check_may_create(policy, "batch_1")  # authentication off
