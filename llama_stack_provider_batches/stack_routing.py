"""Views of the stack's inference routing for batch requests: the part of the stack seam (with
stack.py) that reaches into the router and its providers. They skip two per-request costs.

**Model lookups, remembered for a few seconds.**
Every request through the stack's inference router looks its model up in the model registry: the
router once (its cache answers), and on llama-stack 0.7 the OpenAI-compatible provider again, with
the provider's own model id, which misses the cache and reads the kvstore (on SQLite a connection and
a thread per read). At zero model latency those reads were half of a batch's CPU. A batch sends
thousands of requests for one model under one identity, so a view of the router answers the same
lookups from memory for `seconds`: the router's and the provider's code still run whole (routing,
the access check, tool checks, the stack's metrics), on answers at most that old. A model removed,
or a policy changed, reaches running batches within that time.

Only attribute names are taken from the stack here (`routing_table`, its `get_object_by_identifier`
and `get_provider_impl`, a provider's `model_store`), the same on llama-stack 0.7 and OGX 1.x. When a
router lacks them, `inference_with_lookups` returns None and requests take the plain path.

**Clients kept.** llama-stack 0.7's OpenAI-compatible providers build a new OpenAI client for each
request, with a new HTTP client: each request opens a new connection to the model server (left to
the garbage collector) and looks the platform up in a thread. Views of such a provider keep the
client they built, per API key and base URL, as OGX's providers do: requests reuse connections.
The API key is still read per request, and a new one gets its own client.
"""

import copy
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_ANSWERS = 1024  # a batch may name many models: past this many answers, all are asked again


class Lookups:
    """Answers of the stack's model registry for one identity, each kept for `seconds`.

    Failures are not kept: a lookup that raised is asked again by the next request.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._answers: dict[Hashable, tuple[Any, float]] = {}

    async def answer(self, key: Hashable, ask: Callable[[], Awaitable[T]]) -> T:
        """The kept answer to `key` while it is fresh; else what `ask()` answers now, kept from now on."""
        now = self._clock()
        kept = self._answers.get(key)
        if kept is not None and kept[1] > now:
            return kept[0]  # type: ignore[no-any-return]
        value = await ask()
        if len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()
        self._answers[key] = (value, now + self._seconds)
        return value


class KeptClients:
    """OpenAI clients kept for providers that build a new one per request (see the docstring).

    A provider's view becomes an instance of a subclass (made once per class) whose `client` returns
    the client kept for the provider, API key and base URL of the moment, building it the provider's
    way the first time. Past MAX_KEPT_CLIENTS (per-request keys, say) clients are built per request
    again, as the provider does.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[int, str | None, str], Any] = {}  # (id of config, key, URL) -> client
        self._classes: dict[type, type] = {}

    def keep_for(self, view: Any) -> bool:
        """Make `view` (a copy of a provider) keep its client, if its provider builds one per request."""
        if not _builds_client_per_request(view):
            return False
        cls = type(view)
        if cls not in self._classes:
            namespace = {"__slots__": (), "client": self._kept_client_property(cls)}
            self._classes[cls] = type(cls.__name__, (cls,), namespace)
        object.__setattr__(view, "__class__", self._classes[cls])  # pydantic models refuse plain assignment
        return True

    def _kept_client_property(self, cls: type) -> property:
        build = cls.client.fget  # type: ignore[attr-defined]
        clients = self._clients

        def client(provider: Any) -> Any:
            # By configuration (each view of one provider shares its config), key and URL: one client
            # serves every owner's view of a provider.
            api_key = provider._get_api_key_from_config_or_provider_data()
            key = (id(provider.config), api_key, str(provider.get_base_url()))
            kept = clients.get(key)
            if kept is None:
                kept = build(provider)
                if len(clients) < MAX_KEPT_CLIENTS:
                    clients[key] = kept
            return kept

        return property(client)

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()  # the `client` properties hold this dict
        for client in clients:
            await client.close()


MAX_KEPT_CLIENTS = 16


def _builds_client_per_request(provider: Any) -> bool:
    """Whether `provider` is an OpenAI-compatible one whose `client` property builds a new client each time."""
    if not isinstance(getattr(type(provider), "client", None), property):
        return False
    needed = ("_get_api_key_from_config_or_provider_data", "get_base_url")
    if not all(callable(getattr(provider, name, None)) for name in needed) or not hasattr(provider, "config"):
        return False
    try:
        return provider.client is not provider.client  # OGX's keep theirs
    except Exception:  # no API key until a request brings one, say
        return False


class _RememberingTable:
    """The router's models routing table with its lookups answered by `lookups`; the rest is the table's.

    It is also the model store of the providers it hands out (views of them), which look a request's
    model up again (`has_model`, `get_model`).
    """

    def __init__(self, table: Any, lookups: Lookups, clients: KeptClients | None) -> None:
        self._table = table
        self._lookups = lookups
        self._clients = clients
        self._providers: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    async def get_object_by_identifier(self, kind: str, identifier: str) -> Any:
        return await self._lookups.answer(
            ("object", kind, identifier), lambda: self._table.get_object_by_identifier(kind, identifier)
        )

    async def get_provider_impl(self, *args: Any, **kwargs: Any) -> Any:
        key = ("provider", args, tuple(sorted(kwargs.items())))
        provider = await self._lookups.answer(key, lambda: self._table.get_provider_impl(*args, **kwargs))
        return self._provider_view(provider)

    async def has_model(self, model_id: str) -> bool:
        return await self._lookups.answer(("has_model", model_id), lambda: self._table.has_model(model_id))

    async def get_model(self, model_id: str) -> Any:
        return await self._lookups.answer(("model", model_id), lambda: self._table.get_model(model_id))

    def _provider_view(self, provider: Any) -> Any:
        """A shallow copy of `provider` whose model store is this table and which keeps its client
        (KeptClients); made once per provider."""
        view = self._providers.get(id(provider))
        if view is None:
            view = copy.copy(provider)
            if getattr(provider, "model_store", None) is not None:
                view.model_store = self
            if self._clients is not None:
                self._clients.keep_for(view)
            self._providers[id(provider)] = view
        return view


def inference_with_lookups(router: Any, lookups: Lookups, clients: KeptClients | None = None) -> Any | None:
    """A shallow copy of the inference router whose model lookups (and its providers') go through
    `lookups`, and whose providers keep their `clients`; None when the router is not as expected (a
    stack that changed): use it as it is."""
    table = getattr(router, "routing_table", None)
    if not all(callable(getattr(table, name, None)) for name in ("get_object_by_identifier", "get_provider_impl")):
        return None
    view = copy.copy(router)
    view.routing_table = _RememberingTable(table, lookups, clients)
    return view
