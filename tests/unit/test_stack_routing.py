import copy
from types import SimpleNamespace
from typing import Any

import pytest

from llama_stack_provider_batches import stack_routing
from llama_stack_provider_batches.stack_routing import KeptClients, Lookups, inference_with_lookups


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """A models routing table that counts its lookups, as the stack's reads its database for each."""

    def __init__(self, models: dict[str, str]) -> None:
        self.models = models  # identifier -> provider's own model id
        self.reads = 0
        self.impls_by_provider_id: dict[str, Any] = {}

    async def get_object_by_identifier(self, kind: str, identifier: str) -> dict[str, str] | None:
        self.reads += 1
        if identifier not in self.models:
            return None
        return {"identifier": identifier, "provider_resource_id": self.models[identifier]}

    async def get_provider_impl(self, identifier: str) -> "Provider":
        self.reads += 1
        return self.impls_by_provider_id["p"]

    async def has_model(self, model_id: str) -> bool:
        self.reads += 1
        return model_id in self.models

    async def get_model(self, model_id: str) -> dict[str, str]:
        self.reads += 1
        return {"identifier": model_id, "provider_resource_id": self.models[model_id]}


class Provider:
    """Looks the model up again, as llama-stack 0.7's OpenAI-compatible providers do."""

    def __init__(self, model_store: Registry) -> None:
        self.model_store = model_store

    async def chat(self, model: str) -> str:
        if await self.model_store.has_model(model):
            model = (await self.model_store.get_model(model))["provider_resource_id"]
        return f"answer from {model}"


class Router:
    """Routes as the stack's inference router does: the model, then its provider, then the call."""

    def __init__(self, table: Registry) -> None:
        self.routing_table = table
        self.store = "completion store"

    async def chat(self, model: str) -> str:
        found = await self.routing_table.get_object_by_identifier("model", model)
        if found is None:
            raise LookupError(f"Model '{model}' not found")
        provider = await self.routing_table.get_provider_impl(found["identifier"])
        return await provider.chat(found["provider_resource_id"])


def stack(models: dict[str, str]) -> tuple[Router, Registry]:
    table = Registry(models)
    table.impls_by_provider_id["p"] = Provider(table)
    return Router(table), table


async def test_a_view_looks_each_model_up_once_while_its_answers_are_fresh() -> None:
    router, table = stack({"local/m": "m", "m": "m-raw"})
    clock = Clock()
    view = inference_with_lookups(router, Lookups(2.0, clock))
    assert view is not None
    answers = [await view.chat("local/m") for _ in range(100)]
    assert answers == ["answer from m-raw"] * 100  # the provider's own lookup still happens, answered from memory
    first = table.reads
    assert first == 4  # the router's two, the provider's two
    clock.now = 2.5
    await view.chat("local/m")
    assert table.reads == 2 * first


async def test_the_router_itself_is_left_alone() -> None:
    router, table = stack({"local/m": "m"})
    view = inference_with_lookups(router, Lookups(2.0))
    assert view is not None
    await view.chat("local/m")
    assert router.routing_table is table and view.store == router.store
    assert table.impls_by_provider_id["p"].model_store is table
    await router.chat("local/m")
    await router.chat("local/m")
    assert table.reads == 3 + 2 * 3  # the plain router still reads three times for each request


async def test_a_model_removed_is_seen_once_its_answer_is_stale() -> None:
    router, table = stack({"local/m": "m"})
    clock = Clock()
    view = inference_with_lookups(router, Lookups(2.0, clock))
    assert view is not None
    await view.chat("local/m")
    del table.models["local/m"]
    await view.chat("local/m")  # still fresh
    clock.now = 2.0
    with pytest.raises(LookupError, match="not found"):
        await view.chat("local/m")


async def test_failed_lookups_are_asked_again() -> None:
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("database down")

    lookups = Lookups(10.0)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await lookups.answer("k", failing)
    assert calls == 3


async def test_answers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_routing, "MAX_ANSWERS", 10)
    lookups = Lookups(10.0)
    asked: list[int] = []

    async def ask(n: int) -> int:
        asked.append(n)
        return n

    for n in range(25):
        assert await lookups.answer(n, lambda n=n: ask(n)) == n
    assert len(lookups._answers) <= 10
    assert await lookups.answer(24, lambda: ask(-1)) == 24  # the newest is still kept


def test_a_router_without_a_routing_table_gets_no_view() -> None:
    class Plain:
        async def chat(self, model: str) -> str:
            return model

    assert inference_with_lookups(Plain(), Lookups(1.0)) is None


class Client:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class OpenAICompatible:
    """Builds a new client at each `client`, as llama-stack 0.7's OpenAI-compatible providers do."""

    def __init__(self) -> None:
        self.config = object()
        self.model_store: Any = None
        self.api_key = "k1"
        self.built = 0

    @property
    def client(self) -> Client:
        self.built += 1
        return Client(self.api_key)

    def get_base_url(self) -> str:
        return "http://127.0.0.1:1/v1"

    def _get_api_key_from_config_or_provider_data(self) -> str:
        return self.api_key


async def test_a_view_keeps_the_client_its_provider_would_build_per_request() -> None:
    provider = OpenAICompatible()
    clients = KeptClients()
    view = copy.copy(provider)
    assert clients.keep_for(view)
    assert view.client is view.client and isinstance(view, OpenAICompatible)
    assert provider.client is not provider.client  # the provider itself is left alone
    first = view.client
    view.api_key = "k2"  # a request bringing another key gets a client of its own
    assert view.client is not first and view.client.api_key == "k2"
    other_owner = copy.copy(provider)
    clients.keep_for(other_owner)
    assert other_owner.client is first  # one client per provider configuration, key and URL
    await clients.aclose()
    assert first.closed


def test_a_provider_that_keeps_its_client_is_left_alone() -> None:
    class Keeping(OpenAICompatible):
        kept = Client("k")

        @property
        def client(self) -> Client:
            return self.kept

    view = Keeping()
    assert not KeptClients().keep_for(view) and type(view) is Keeping


async def test_the_stack_openai_adapter_keeps_one_client_in_its_view() -> None:
    adapter_module = pytest.importorskip("llama_stack.providers.remote.inference.openai.openai")
    config_module = pytest.importorskip("llama_stack.providers.remote.inference.openai.config")
    adapter = adapter_module.OpenAIInferenceAdapter(
        config=config_module.OpenAIConfig(api_key="x", base_url="http://127.0.0.1:9/v1")
    )
    # What the stack sets when it builds the provider: a spec with a provider-data validator.
    adapter.__provider_spec__ = SimpleNamespace(
        provider_type="remote::openai", provider_data_validator=f"{config_module.__name__}.OpenAIProviderDataValidator"
    )
    clients = KeptClients()
    view = copy.copy(adapter)
    assert clients.keep_for(view)
    assert view.client is view.client
    assert adapter.client is not adapter.client
    await clients.aclose()
