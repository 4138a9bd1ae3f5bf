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
from pydantic import BaseModel

from ..stack import (
    CONFIG_VARIABLE,
    PROVIDER_DATA_VAR,
    AccessDeniedError,
    AccessRule,
    Action,
    RequestProviderDataContext,
    RouteAccessRule,
    User,
    get_authenticated_user,
    is_action_allowed,
    replace_env_vars,
    route_allowed,
    tenant_of,
    user,
)

UNOWNED_SCOPE = "_"


class Owner(BaseModel):
    """The user who created a batch, as stored with it."""

    principal: str
    attributes: dict[str, list[str]] | None = None
    tenant_id: str | None = None  # OGX's tenancy; None on llama-stack

    def as_user(self) -> User:
        return user(self.principal, self.attributes, self.tenant_id)


@dataclass(frozen=True)
class BatchResource:
    """A batch as the stack's access control sees it."""

    identifier: str
    owner: User | None
    type: str = "batch"


def current_owner() -> Owner | None:
    """The authenticated caller of the current request, if authentication is on."""
    caller = get_authenticated_user()
    if caller is None:
        return None
    return Owner(principal=caller.principal, attributes=caller.attributes, tenant_id=tenant_of(caller))


def scope_of(owner: Owner | None) -> str:
    """The storage scope of an owner's idempotency keys and list index."""
    if owner is None:
        return UNOWNED_SCOPE
    # A tenant's users are not another tenant's, even with the same principal (OGX).
    who = owner.principal if owner.tenant_id is None else f"{owner.tenant_id}\x00{owner.principal}"
    return hashlib.sha256(who.encode()).hexdigest()[:32]


def may(policy: list[AccessRule], action: Action, batch_id: str, owner: Owner | None, kind: str = "batch") -> bool:
    """Whether the current caller may do `action` on the batch `batch_id` (or other resource of
    `kind`: a `webhook_endpoint`) owned by `owner`."""
    resource = BatchResource(batch_id, None if owner is None else owner.as_user(), kind)
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

    A user the policy forbids `/v1/embeddings` may not get embeddings through a batch either. OGX hands
    the route policy to get_provider_impl; llama-stack does not, so there it is read from the run
    config the server was started with (`LLAMA_STACK_CONFIG`).
    """

    def __init__(self, route_policy: list[RouteAccessRule]) -> None:
        self._route_policy = route_policy

    @classmethod
    def from_stack_config(cls, path: str | None = None) -> "RouteGuard":
        path = path or os.environ.get(CONFIG_VARIABLE)
        if not path or not os.path.isfile(path):
            return cls([])
        with open(path) as config_file:
            config = replace_env_vars(yaml.safe_load(config_file)) or {}
        rules = ((config.get("server") or {}).get("auth") or {}).get("route_policy") or []
        return cls([RouteAccessRule(**rule) for rule in rules])

    def allows(self, endpoint: str) -> bool:
        """Whether the current caller may use `endpoint` under the route policy."""
        return route_allowed(endpoint, get_authenticated_user(), self._route_policy)
