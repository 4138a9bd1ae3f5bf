import asyncio

import pytest
from cryptography.fernet import Fernet

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.api import webhook_endpoints
from llama_stack_provider_batches.api.webhook_endpoints import (
    CreateEndpoint,
    RotateSecret,
    UpdateEndpoint,
    WebhookEndpoints,
)
from llama_stack_provider_batches.domain.errors import (
    InvalidParameterError,
    LimitReachedError,
    WebhookEndpointNotFoundError,
)
from llama_stack_provider_batches.domain.ownership import Owner, acting_as
from llama_stack_provider_batches.storage.secrets import SecretBox

ALICE = Owner(principal="alice", attributes={"teams": ["a"]})
BOB = Owner(principal="bob", attributes={"teams": ["b"]})


async def public(host: str, port: int) -> list[str]:
    """Every name resolves to a public address (no DNS in unit tests)."""
    return ["93.184.215.14"]


@pytest.fixture
def endpoints(idle_provider: BatchesService) -> WebhookEndpoints:
    assert idle_provider.webhooks is not None
    idle_provider.webhooks._resolve = public
    return idle_provider.webhooks


def create(url: str = "https://hooks.example.com/h", **fields: object) -> CreateEndpoint:
    return CreateEndpoint(**{"name": "mine", "url": url, "event_types": ["batch.completed"], **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        (create(url="http://hooks.example.com/h"), "url", "invalid_url"),
        (create(url="https://169.254.169.254/latest"), "url", "invalid_url"),
        (create(url="https://10.0.0.1/h"), "url", "invalid_url"),
        (create(event_types=[]), "event_types", "empty_array"),
        (create(event_types=["response.completed"]), "event_types", "invalid_value"),
        (create(name=""), "name", "invalid_value"),
        (create(name="x" * 300), "name", "invalid_value"),
    ],
)
async def test_bad_endpoints_are_refused_naming_the_parameter(
    endpoints: WebhookEndpoints, params: CreateEndpoint, param: str, code: str
) -> None:
    with pytest.raises(InvalidParameterError) as refused:
        await endpoints.create(params)
    assert (refused.value.param, refused.value.code) == (param, code)


async def test_the_secret_is_shown_at_create_and_rotate_only(endpoints: WebhookEndpoints) -> None:
    made = await endpoints.create(create(event_types=["batch.completed", "batch.completed", "batch.failed"]))
    assert made["signing_secret"].startswith("whsec_") and made["event_types"] == ["batch.completed", "batch.failed"]
    shown = await endpoints.retrieve(made["id"])
    assert "signing_secret" not in shown and shown["signing_secret_hint"] == made["signing_secret_hint"]
    listed = await endpoints.page(None, 20)
    assert "signing_secret" not in listed["data"][0] and made["signing_secret"] not in str(listed)
    rotated = await endpoints.rotate_secret(made["id"], RotateSecret())
    assert rotated["signing_secret"] != made["signing_secret"]
    assert (await endpoints.retrieve(made["id"]))["signing_secret_hint"] == rotated["signing_secret_hint"]


async def test_an_update_changes_only_what_it_names(endpoints: WebhookEndpoints) -> None:
    made = await endpoints.create(create())
    updated = await endpoints.update(made["id"], UpdateEndpoint(event_types=["batch.failed"]))
    assert (updated["name"], updated["url"], updated["event_types"]) == ("mine", made["url"], ["batch.failed"])
    with pytest.raises(InvalidParameterError):
        await endpoints.update(made["id"], UpdateEndpoint(url="https://127.0.0.2/h"))


async def test_users_never_see_change_or_delete_each_others_endpoints(endpoints: WebhookEndpoints) -> None:
    with acting_as(ALICE):
        alices = await endpoints.create(create())
    with acting_as(BOB):
        for attempt in (
            endpoints.retrieve(alices["id"]),
            endpoints.update(alices["id"], UpdateEndpoint(name="mine now")),
            endpoints.delete(alices["id"]),
            endpoints.rotate_secret(alices["id"], RotateSecret()),
        ):
            with pytest.raises(WebhookEndpointNotFoundError):
                await attempt
        assert (await endpoints.page(None, 20))["data"] == []
    with acting_as(ALICE):
        assert [e["id"] for e in (await endpoints.page(None, 20))["data"]] == [alices["id"]]
        assert (await endpoints.delete(alices["id"]))["deleted"] is True


async def test_a_user_may_register_a_bounded_number_of_endpoints(
    endpoints: WebhookEndpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoints._config, "max_endpoints_per_user", 2)
    with acting_as(ALICE):
        for _ in range(2):
            await endpoints.create(create())
        with pytest.raises(LimitReachedError):
            await endpoints.create(create())
    with acting_as(BOB):  # another user's limit is their own
        await endpoints.create(create())


async def test_creates_at_the_same_time_cannot_pass_the_limit_together(
    endpoints: WebhookEndpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoints._config, "max_endpoints_per_user", 2)
    with acting_as(ALICE):
        outcomes = await asyncio.gather(*(endpoints.create(create()) for _ in range(6)), return_exceptions=True)
        assert sum(isinstance(o, dict) for o in outcomes) == 2
        assert sum(isinstance(o, LimitReachedError) for o in outcomes) == 4
        assert len((await endpoints.page(None, 20))["data"]) == 2


async def test_an_update_that_changes_nothing_keeps_updated_at(endpoints: WebhookEndpoints) -> None:
    endpoints._clock = lambda: 1000.0
    made = await endpoints.create(create())
    endpoints._clock = lambda: 2000.0
    same = await endpoints.update(made["id"], UpdateEndpoint(name=made["name"], url=made["url"]))
    assert same["updated_at"] == 1000  # OpenAI: "tests and unchanged updates do not advance it"
    assert (await endpoints.update(made["id"], UpdateEndpoint(name="renamed")))["updated_at"] == 2000


async def test_an_endpoint_whose_secret_this_server_cannot_open_is_still_listed_read_and_deleted(
    endpoints: WebhookEndpoints,
) -> None:
    made = await endpoints.create(create())
    endpoints._store._box = SecretBox(Fernet.generate_key())  # the server's key changed since
    assert (await endpoints.retrieve(made["id"]))["signing_secret_hint"] == made["signing_secret_hint"]
    assert [e["id"] for e in (await endpoints.page(None, 20))["data"]] == [made["id"]]
    with pytest.raises(InvalidParameterError) as refused:
        await endpoints.test(made["id"], webhook_endpoints.TestEndpoint(event_type="batch.completed"), client=None)
    assert refused.value.code == "signing_secret_unavailable" and "rotate" in refused.value.message
    rotated = await endpoints.rotate_secret(made["id"], RotateSecret(keep_old_secret_active_for_24_hours=True))
    assert (await endpoints.retrieve(made["id"]))["signing_secret_hint"] == rotated["signing_secret_hint"]
    assert (await endpoints.delete(made["id"]))["deleted"] is True


async def test_ids_that_cannot_be_endpoints_are_not_found_without_a_lookup(endpoints: WebhookEndpoints) -> None:
    for endpoint_id in ("batch_1", "", "we_" + "x" * 500):
        with pytest.raises(WebhookEndpointNotFoundError):
            await endpoints.retrieve(endpoint_id)


async def test_a_name_that_resolves_inside_the_machine_is_refused_at_create(endpoints: WebhookEndpoints) -> None:
    async def to_metadata(host: str, port: int) -> list[str]:
        return ["169.254.169.254"] if host == "inside.example.com" else ["93.184.215.14"]

    endpoints._resolve = to_metadata
    with pytest.raises(InvalidParameterError) as refused:
        await endpoints.create(create(url="https://inside.example.com/h"))
    assert refused.value.code == "invalid_url" and "169.254.169.254" in refused.value.message
    assert (await endpoints.create(create(url="https://outside.example.com/h")))["url"].startswith("https://outside")
