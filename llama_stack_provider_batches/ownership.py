"""Who a batch belongs to, and who may see it: the stack's own users and access policy applied to batches.

With authentication on, the stack puts the caller in the request context; a batch records that
user (principal and attributes, never credentials) as its owner. Every read or change of a batch
asks the stack's `is_action_allowed` with the policy handed to the provider (the stack's default
policy when it is empty: owner, or shared roles/teams/projects/namespaces). A batch the caller may
not read is reported missing, exactly like one that does not exist.

Idempotency keys and the list index are kept per owner (`scope_of`), so users never share either.
With authentication off there is no user: every batch is unowned and lives in one scope.
"""

import hashlib
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import yaml
from llama_stack.core.access_control.access_control import AccessDeniedError, is_action_allowed
from llama_stack.core.access_control.datatypes import AccessRule, Action, RouteAccessRule
from llama_stack.core.datatypes import User
from llama_stack.core.request_headers import PROVIDER_DATA_VAR, RequestProviderDataContext, get_authenticated_user
from llama_stack.core.server.auth import RouteAuthorizationMiddleware
from llama_stack.core.stack import replace_env_vars
from pydantic import BaseModel

UNOWNED_SCOPE = "_"


class Owner(BaseModel):
    """The user who created a batch, as stored with it."""

    principal: str
    attributes: dict[str, list[str]] | None = None

    def as_user(self) -> User:
        return User(self.principal, self.attributes)


@dataclass(frozen=True)
class BatchResource:
    """A batch as the stack's access control sees it."""

    identifier: str
    owner: User | None
    type: str = "batch"


def current_owner() -> Owner | None:
    """The authenticated caller of the current request, if authentication is on."""
    user = get_authenticated_user()
    return None if user is None else Owner(principal=user.principal, attributes=user.attributes)


def scope_of(owner: Owner | None) -> str:
    """The storage scope of an owner's idempotency keys and list index."""
    return UNOWNED_SCOPE if owner is None else hashlib.sha256(owner.principal.encode()).hexdigest()[:32]


def may(policy: list[AccessRule], action: Action, batch_id: str, owner: Owner | None) -> bool:
    """Whether the current caller may do `action` on the batch `batch_id` owned by `owner`."""
    resource = BatchResource(batch_id, None if owner is None else owner.as_user())
    return is_action_allowed(policy, action, resource, get_authenticated_user())


def check_may_create(policy: list[AccessRule], batch_id: str) -> None:
    """Raise the stack's AccessDeniedError (HTTP 403) unless the current caller may create the batch `batch_id`.

    Asked as the stack's routing tables ask before registering a resource: the batch has no owner
    yet, so a rule on `batch::*` (or on the caller) applies, and `resource is unowned` holds while
    `user is owner` does not. Under the default policy everyone may create.
    """
    resource = BatchResource(batch_id, None)
    user = get_authenticated_user()
    if not is_action_allowed(policy, Action.CREATE, resource, user):
        raise AccessDeniedError(Action.CREATE.value, resource, user)


CREDENTIAL_NAME_PARTS: tuple[str, ...] = ("key", "token", "secret", "password", "credential", "auth")


def is_credential(name: object, value: object) -> bool:
    """Whether one provider-data entry is a credential: a name that says so, with a non-blank string value."""
    if not isinstance(name, str) or name == "__authenticated_user":  # the stack's own entry: who, not a secret
        return False
    lowered = name.lower()
    return any(part in lowered for part in CREDENTIAL_NAME_PARTS) and isinstance(value, str) and bool(value.strip())


def carries_request_credentials() -> bool:
    """Whether the current request brought per-request credentials in `X-LlamaStack-Provider-Data`.

    Only real credentials count: an entry whose name contains `key`, `token`, `secret`, `password`,
    `credential` or `auth` (any case; the stack's `__authenticated_user` excepted) and whose value is
    a non-blank string, such as `{"openai_api_key": "sk-..."}`. A batch created with them is pinned
    to the server that received them (they are never stored), where it waits its turn with the
    others; a header holding anything else (`{}`, `{"foo": "bar"}`, an empty key) pins nothing.
    """
    provider_data = PROVIDER_DATA_VAR.get()
    if not isinstance(provider_data, dict):  # the header may hold any JSON, a list say
        return False
    return any(is_credential(name, value) for name, value in provider_data.items())


def acting_as(owner: Owner | None) -> AbstractContextManager[None]:
    """Run background work as the batch's owner when no request context carries a user (after a restart).

    Only the identity is restored; per-request provider credentials are never stored, so work resumed
    after a restart uses what the stack is configured with, under the owner's access rights.
    """
    if owner is None or get_authenticated_user() is not None:
        return nullcontext()
    return RequestProviderDataContext(user=owner.as_user())


class RouteGuard:
    """The stack's route policy (`server.auth.route_policy`), applied to the endpoint a batch would call.

    A user the policy forbids `/v1/embeddings` may not get embeddings through a batch either. The
    stack does not hand its route policy to providers, so it is read from the run config the server
    was started with (`LLAMA_STACK_CONFIG`) and judged by the stack's own route middleware.
    """

    def __init__(self, route_policy: list[RouteAccessRule]) -> None:
        self._middleware = RouteAuthorizationMiddleware(app=None, route_policy=route_policy)  # type: ignore[arg-type]
        self._enabled = bool(route_policy)

    @classmethod
    def from_stack_config(cls, path: str | None = None) -> "RouteGuard":
        path = path or os.environ.get("LLAMA_STACK_CONFIG")
        if not path or not os.path.isfile(path):
            return cls([])
        with open(path) as config_file:
            config = replace_env_vars(yaml.safe_load(config_file)) or {}
        rules = ((config.get("server") or {}).get("auth") or {}).get("route_policy") or []
        return cls([RouteAccessRule(**rule) for rule in rules])

    def allows(self, endpoint: str) -> bool:
        """Whether the current caller may use `endpoint` under the route policy."""
        return not self._enabled or self._middleware._is_route_allowed(endpoint, get_authenticated_user())
