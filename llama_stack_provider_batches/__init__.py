"""llama-stack-provider-batches: a production-grade OpenAI Batch API provider for llama-stack 0.7
and OGX 1.x (stack.py tells them apart).

Enable it by adding `module: llama_stack_provider_batches` to the batches provider of run.yaml.
The stack then calls `provider.get_provider_spec()` and `get_provider_impl(config, deps, policy)`
(OGX adds its `route_policy`).
"""

from typing import Any

from . import telemetry
from .api.http_errors import use_openai_error_routes
from .api.service import BatchesService
from .api.webhook_endpoints import WebhookEndpoints, batches_and_webhook_routes
from .config import BatchesProviderConfig
from .domain.lifecycle import is_terminal
from .domain.ownership import RouteGuard
from .engine.housekeeping import Housekeeper
from .engine.runner import BatchRunner
from .engine.startup import start_on_serving_loop, stop_before
from .engine.webhook_delivery import WebhookDeliverer
from .requests.stack_apis import StackAPIs
from .stack import (
    DEPENDENCIES_SHUT_DOWN_FIRST,
    Api,
    BatchObject,
    get_logger,
    inference_providers,
    kvstore_impl,
    reconnect_postgres_kvstores,
)
from .storage.secrets import SecretBox
from .storage.sql_store import SQLBatchStore

__all__ = ["BatchesProviderConfig", "BatchesService", "get_provider_impl"]


async def get_provider_impl(
    config: BatchesProviderConfig,
    deps: dict[Api, Any],
    policy: list[Any] | None = None,
    route_policy: list[Any] | None = None,
) -> BatchesService:
    """Build the provider over the configured store(s) and the stack's APIs: inference, files and models,
    and, where the stack serves them, responses and safety (with its shields) for those endpoints."""
    missing = [api.value for api in (Api.inference, Api.files, Api.models) if deps.get(api) is None]
    if missing:
        raise ValueError(f"The batches provider needs these APIs in the stack: {', '.join(missing)}")
    config.webhooks.check_endpoints()
    if reconnect_postgres_kvstores():  # the registry there must outlive a database restart (stack.py)
        get_logger(name=__name__, category="providers").info(
            "The stack's PostgreSQL kvstore reconnects after a restart"
        )
    # Read once, for batches an earlier release kept there (llama-stack's built-in provider's store).
    kvstore = await kvstore_impl(config.kvstore) if config.kvstore is not None else None
    namespace = config.kvstore.namespace if config.kvstore is not None else ""
    deliverer: WebhookDeliverer | None = None

    def moved(before: BatchObject, after: BatchObject) -> None:
        telemetry.batch_moved(before, after)
        if deliverer is not None and is_terminal(after.status):
            deliverer.wake()  # its event was written with the move: deliver it now

    store = SQLBatchStore(config.sql_store, kvstore, namespace, on_move=moved)
    webhook_store = store.webhook_store(
        SecretBox.from_config(config.webhooks.secrets_key, config.webhooks.secrets_key_file)
    )
    deliverer = WebhookDeliverer(webhook_store, config.webhooks)
    apis = StackAPIs(
        inference=deps[Api.inference],
        models=deps[Api.models],
        responses=deps.get(Api.responses),
        safety=deps.get(Api.__members__.get("safety")),  # OGX's Api has no safety nor shields
        shields=deps.get(Api.__members__.get("shields")),
    )
    runner = BatchRunner(store, config, apis, deps[Api.files])
    runner.deliverer = deliverer
    runner.housekeeper = Housekeeper(store.retention, deps[Api.files], config)
    # OGX passes its route policy; llama-stack does not, and it is read from the run config instead.
    routes = RouteGuard(route_policy) if route_policy is not None else RouteGuard.from_stack_config()
    service = BatchesService(config, store, runner, policy, routes, files=deps[Api.files], apis=apis)
    service.webhooks = WebhookEndpoints(webhook_store, config.webhooks, policy or [])
    service.webhook_client = deliverer.client
    await service.initialize()
    start_on_serving_loop(deps[Api.models], service.start)
    if DEPENDENCIES_SHUT_DOWN_FIRST:  # OGX: requests in flight finish before the inference clients close
        for dependency in inference_providers(deps[Api.inference]):
            stop_before(dependency, runner.shutdown)
    use_openai_error_routes(batches_and_webhook_routes)
    return service
