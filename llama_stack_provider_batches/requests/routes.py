"""Which stack API objects a batch request goes through: the stack's own, as views that skip two of
its per-request costs a batch need not pay.

- Chat completions skip the stack's completion store unless their body says `store: true`
  (`without_completion_store`).
- Model lookups are remembered per identity for `lookup_seconds` (stack_routing.py): a batch's
  requests name one model under one owner, and the stack looks it up again, from its database, for
  each of them. With them, providers that would build a client (and open a connection) per request keep one.

Both are views (shallow copies) of the stack's router: routing, the access policy and the stack's
metrics are its own code, run for each request.
"""

import copy
from collections import OrderedDict
from dataclasses import replace

from ..domain.ownership import current_owner
from ..stack import Inference, get_logger
from ..stack_routing import KeptClients, Lookups, inference_with_lookups
from .stack_apis import StackAPIs

logger = get_logger(name=__name__, category="providers")

MAX_IDENTITIES = 256  # views kept for this many owners; the least recently used goes first


def without_completion_store(inference: Inference) -> Inference:
    """The stack's inference router, minus the store it records every chat completion in.

    Batch chat completions use this view unless their body says `store: true`, for two reasons. OpenAI
    stores a chat completion only when asked to. And the stack's SQLite store writes each completion
    in its own task with no queue: at batch rates (hundreds a second) its writes fail ("database is
    locked", pool exhausted), and logging those failures stalled the whole server in our runs. The
    view is a shallow copy sharing everything else (routing, access checks, metrics). Responses and
    moderations cannot skip it: the stack's Responses and Safety providers call the inference router
    they were built with.
    """
    if getattr(inference, "store", None) is None:
        return inference
    view = copy.copy(inference)
    view.store = None  # type: ignore[attr-defined]
    return view


class StackRoutes:
    """The stack APIs for a request of the current identity (the batch's owner, or none)."""

    def __init__(self, apis: StackAPIs, lookup_seconds: float) -> None:
        self._apis = apis
        self._lookup_seconds = lookup_seconds
        self._views: OrderedDict[tuple[str, bool], StackAPIs] = OrderedDict()
        self._clients = KeptClients()
        self.remembers_lookups = lookup_seconds > 0 and self._inference(True) is not apis.inference
        if lookup_seconds > 0 and not self.remembers_lookups:
            logger.warning(
                "The stack's inference router is not as this provider expects: batch requests look their "
                "model up in the registry one by one, as direct requests do (slower at high rates)"
            )

    def for_request(self, stored: bool) -> StackAPIs:
        """The APIs for a request of the current identity; `stored`: its body asks for `store: true`."""
        owner = current_owner()
        key = (owner.model_dump_json() if owner is not None else "", stored)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = replace(self._apis, inference=self._inference(stored))
            if len(self._views) > MAX_IDENTITIES:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(key)
        return view

    def _inference(self, stored: bool) -> Inference:
        router = self._apis.inference if stored else without_completion_store(self._apis.inference)
        if self._lookup_seconds <= 0:
            return router
        return inference_with_lookups(router, Lookups(self._lookup_seconds), self._clients) or router

    async def aclose(self) -> None:
        """Close the clients the views kept."""
        self._views.clear()
        await self._clients.aclose()
