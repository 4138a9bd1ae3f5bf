"""llama-stack-provider-batches: a production-grade OpenAI Batch API provider for llama-stack.

Enable it by adding `module: llama_stack_provider_batches` to the batches provider of run.yaml.
The stack then calls `provider.get_provider_spec()` and `get_provider_impl(config, deps, policy)`.
"""

from typing import Any

from llama_stack.core.storage.kvstore import kvstore_impl
from llama_stack_api import Api

from . import telemetry
from .config import BatchesProviderConfig
from .engine import BatchRunner
from .http_errors import use_openai_error_routes
from .ownership import RouteGuard
from .service import BatchesService
from .sql_store import SQLBatchStore
from .stack_apis import StackAPIs
from .startup import start_on_serving_loop

__all__ = ["BatchesProviderConfig", "BatchesService", "get_provider_impl"]


async def get_provider_impl(
    config: BatchesProviderConfig, deps: dict[Api, Any], policy: list[Any] | None = None
) -> BatchesService:
    """Build the provider over the configured store(s) and the stack's APIs: inference, files and models,
    and, where the stack serves them, responses and safety (with its shields) for those endpoints."""
    missing = [api.value for api in (Api.inference, Api.files, Api.models) if deps.get(api) is None]
    if missing:
        raise ValueError(f"The batches provider needs these APIs in the stack: {', '.join(missing)}")
    kvstore = await kvstore_impl(config.kvstore)  # read once, for batches an earlier release stored there
    store = SQLBatchStore(config.sql_store, kvstore, config.kvstore.namespace, on_move=telemetry.batch_moved)
    apis = StackAPIs(
        inference=deps[Api.inference],
        models=deps[Api.models],
        responses=deps.get(Api.responses),
        safety=deps.get(Api.safety),
        shields=deps.get(Api.shields),
    )
    runner = BatchRunner(store, config, apis, deps[Api.files])
    routes = RouteGuard.from_stack_config()
    service = BatchesService(config, store, runner, policy, routes, files=deps[Api.files], apis=apis)
    await service.initialize()
    start_on_serving_loop(deps[Api.models], service.start)
    use_openai_error_routes()
    return service
