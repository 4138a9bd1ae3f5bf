import logging
from typing import Any

import pytest

from llama_stack_provider_batches.requests import routes
from llama_stack_provider_batches.requests.routes import StackRoutes, without_completion_store
from llama_stack_provider_batches.requests.stack_apis import StackAPIs
from llama_stack_provider_batches.stack import RequestProviderDataContext, User, get_authenticated_user
from tests.unit.conftest import FakeInference, FakeModels


class RouterWithStore:
    def __init__(self) -> None:
        self.store = object()
        self.routing_table = object()


def test_without_completion_store_is_a_view_that_leaves_the_router_alone() -> None:
    router = RouterWithStore()
    view = without_completion_store(router)
    assert view.store is None
    assert view.routing_table is router.routing_table
    assert router.store is not None
    plain = FakeInference()
    assert without_completion_store(plain) is plain


class PolicyTable:
    """A routing table whose answer depends on who asks, as the stack's access check does."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_object_by_identifier(self, kind: str, identifier: str) -> str | None:
        self.reads += 1
        caller = get_authenticated_user()
        return identifier if caller is not None and caller.principal == "alice" else None

    async def get_provider_impl(self, identifier: str) -> Any:
        return None


class PolicyRouter:
    def __init__(self) -> None:
        self.routing_table = PolicyTable()
        self.store = None

    async def visible(self, model: str) -> bool:
        return await self.routing_table.get_object_by_identifier("model", model) is not None


def routes_for(router: Any, seconds: float = 5.0) -> StackRoutes:
    return StackRoutes(StackAPIs(inference=router, models=FakeModels(set())), seconds)


async def test_each_identity_has_its_own_answers() -> None:
    router = PolicyRouter()
    stack_routes = routes_for(router)
    with RequestProviderDataContext(user=User("alice", {"teams": ["red"]})):
        alice = stack_routes.for_request(stored=False).inference
        assert await alice.visible("m") and await alice.visible("m")
        assert stack_routes.for_request(stored=False).inference is alice
    with RequestProviderDataContext(user=User("bob", {"teams": ["blue"]})):
        bob = stack_routes.for_request(stored=False).inference
        assert bob is not alice
        assert not await bob.visible("m")  # alice's answer is not bob's
    assert router.routing_table.reads == 2


async def test_no_lookup_seconds_means_the_stack_router_as_it_is() -> None:
    router = PolicyRouter()
    stack_routes = routes_for(router, seconds=0)
    assert not stack_routes.remembers_lookups
    assert stack_routes.for_request(stored=True).inference is router


def test_a_router_not_as_expected_is_used_plainly_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    plain = FakeInference()
    with caplog.at_level(logging.WARNING):
        stack_routes = routes_for(plain)
    assert not stack_routes.remembers_lookups
    assert stack_routes.for_request(stored=True).inference is plain
    assert "not as this provider expects" in caplog.text


def test_views_are_kept_for_a_bounded_number_of_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "MAX_IDENTITIES", 3)
    stack_routes = routes_for(PolicyRouter())
    for n in range(10):
        with RequestProviderDataContext(user=User(f"user{n}", {"teams": [f"t{n}"]})):
            stack_routes.for_request(stored=False)
    assert len(stack_routes._views) == 3
