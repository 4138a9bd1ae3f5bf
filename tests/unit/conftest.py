"""Unit-test fixtures: the provider built through `get_provider_impl` over a real SQLite kvstore,
with in-memory stand-ins for the stack's Files, Inference, Models, Responses, Safety and Shields APIs."""

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService, get_provider_impl
from llama_stack_provider_batches.config import WebhooksConfig
from llama_stack_provider_batches.stack import (
    Api,
    KVStoreReference,
    ModelNotFoundError,
    SqliteKVStoreConfig,
    SqlStoreReference,
    get_authenticated_user,
    kvstore_impl,
    register_kvstore_backends,
)
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.unit.backends import sql_reference


class FakeResponse(BaseModel, extra="allow"):
    """Any OpenAI response body: the engine only dumps it to JSON."""


class FakeFiles:
    """The Files API, kept in a dict."""

    def __init__(self) -> None:
        self.contents: dict[str, bytes] = {}
        self.names: dict[str, str] = {}
        self.purposes: dict[str, str] = {}
        self.created: dict[str, int] = {}
        self.readers: list[str | None] = []  # the authenticated principal of each content read

    def add(self, content: bytes, name: str = "input.jsonl", purpose: str = "batch") -> str:
        file_id = f"file-{uuid.uuid4().hex}"
        self.contents[file_id] = content
        self.names[file_id] = name
        self.purposes[file_id] = purpose
        self.created[file_id] = int(time.time())
        return file_id

    async def openai_retrieve_file(self, request: Any) -> Any:
        file_id = request.file_id
        if file_id not in self.contents:
            raise FileNotFoundError(file_id)
        return FakeResponse(id=file_id, bytes=len(self.contents[file_id]), purpose=self.purposes.get(file_id, "batch"))

    async def openai_retrieve_file_content(self, request: Any) -> Any:
        user = get_authenticated_user()
        self.readers.append(user.principal if user else None)
        if request.file_id not in self.contents:
            raise FileNotFoundError(request.file_id)
        return FakeResponse(body=self.contents[request.file_id])

    async def openai_list_files(self, request: Any) -> Any:
        """Newest first, as the stack's default order; `after` is a file id."""
        ids = list(reversed(self.contents))
        if request.after is not None:
            ids = ids[ids.index(request.after) + 1 :]
        if request.purpose is not None:
            ids = [i for i in ids if self.purposes.get(i, "batch") == str(request.purpose)]
        page = ids[: request.limit]
        data = [
            FakeResponse(id=i, filename=self.names[i], bytes=len(self.contents[i]), created_at=self.created[i])
            for i in page
        ]
        return FakeResponse(data=data, has_more=len(ids) > len(page))

    async def openai_upload_file(self, request: Any, file: Any) -> Any:
        file_id = self.add(await file.read(), file.filename, str(request.purpose))
        return FakeResponse(id=file_id, purpose=request.purpose)


class FakeInference:
    """The Inference API: echoes prompts; `behaviour(body)` may raise or wait to script a request."""

    def __init__(self) -> None:
        self.behaviour: Callable[[dict[str, Any]], Any] | None = None
        self.calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def stall_after(self, calls: int, seconds: float = 3600) -> None:
        """Answer the first `calls` requests at once; hold every later one for `seconds`."""

        async def stall(_: dict[str, Any]) -> None:
            if len(self.calls) > calls:
                await asyncio.sleep(seconds)

        self.behaviour = stall

    async def _answer(self, params: BaseModel, kind: str) -> FakeResponse:
        body = params.model_dump(exclude_none=True)
        self.calls.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.behaviour is not None:
                outcome = self.behaviour(body)
                if asyncio.iscoroutine(outcome):
                    await outcome
            await asyncio.sleep(0)
            echo = str(body.get("messages") or body.get("prompt") or body.get("input"))
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            return FakeResponse(object=kind, model=body.get("model"), echo=echo, usage=usage)
        finally:
            self.in_flight -= 1

    async def openai_chat_completion(self, params: BaseModel) -> FakeResponse:
        return await self._answer(params, "chat.completion")

    async def openai_completion(self, params: BaseModel) -> FakeResponse:
        return await self._answer(params, "text_completion")

    async def openai_embeddings(self, params: BaseModel) -> FakeResponse:
        return await self._answer(params, "list")


class FakeResponses:
    """The Responses API: answers through the fake inference (so its behaviour scripts both), as the stack's
    does. A streamed request gets the stack's events: a failure of the model ends it `response.failed`,
    with the error code the stack gives (a status of 429 `rate_limit_exceeded`, 5xx `server_error`)."""

    def __init__(self, inference: FakeInference) -> None:
        self.inference = inference
        self.requests: list[dict[str, Any]] = []

    async def create_openai_response(self, request: BaseModel) -> Any:
        self.requests.append(request.model_dump(exclude_none=True))
        events = self._events(request)
        if getattr(request, "stream", False):
            return events
        async for event in events:
            if event.type == "response.completed":
                return event.response
        raise RuntimeError("the response failed")

    async def _events(self, request: BaseModel) -> AsyncIterator[FakeResponse]:
        response_id = f"resp_{uuid.uuid4().hex}"
        try:
            answer = await self.inference._answer(request, "response")
        except Exception as exc:
            status = getattr(exc, "status_code", 500)
            code = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "invalid_prompt"
            error = FakeResponse(code=code, message=str(exc))
            yield FakeResponse(type="response.failed", response=FakeResponse(id=response_id, error=error))
            return
        usage = {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10}
        response = FakeResponse(id=response_id, object="response", status="completed", echo=answer.echo, usage=usage)
        yield FakeResponse(type="response.created", response=response)
        yield FakeResponse(type="response.completed", response=response)


class FakeSafety:
    """The Safety API: flags inputs mentioning a bomb. `safety_config` names the default shield, as the router's."""

    def __init__(self, inference: FakeInference, default_shield_id: str | None = "guard") -> None:
        self.inference = inference
        self.safety_config = FakeResponse(default_shield_id=default_shield_id)

    async def run_moderation(self, request: BaseModel) -> FakeResponse:
        await self.inference._answer(request, "moderation")
        texts = request.input if isinstance(request.input, list) else [request.input]
        results = [{"flagged": "bomb" in text, "categories": {"weapons": "bomb" in text}} for text in texts]
        return FakeResponse(id=f"modr-{uuid.uuid4().hex}", model=request.model or "local/m-guard", results=results)


class FakeShields:
    """The Shields API: one shield, `guard`, over the model local/m-guard."""

    def __init__(self) -> None:
        self.shields = [FakeResponse(identifier="guard", provider_resource_id="local/m-guard")]

    async def list_shields(self) -> FakeResponse:
        return FakeResponse(data=self.shields)


class FakeModels:
    """The Models API, knowing a fixed set of model ids."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.lookups: list[str] = []

    async def list_models(self) -> Any:
        return FakeResponse(data=[FakeResponse(identifier=model) for model in sorted(self.known)])

    async def get_model(self, request: Any) -> Any:
        self.lookups.append(request.model_id)
        if request.model_id not in self.known:
            raise ModelNotFoundError(request.model_id)
        return FakeResponse(identifier=request.model_id)


@pytest.fixture
def files() -> FakeFiles:
    return FakeFiles()


@pytest.fixture
def inference() -> FakeInference:
    return FakeInference()


@pytest.fixture
def models() -> FakeModels:
    return FakeModels({"local/m-chat", "local/m-embed"})


HAS_SAFETY = "safety" in Api.__members__  # OGX has no Safety API


def stack_deps(files: FakeFiles, inference: FakeInference, models: FakeModels) -> dict[Api, Any]:
    """The APIs a stack serving every endpoint gives the provider."""
    return {
        Api.files: files,
        Api.inference: inference,
        Api.models: models,
        Api.responses: FakeResponses(inference),
        **({Api("safety"): FakeSafety(inference), Api("shields"): FakeShields()} if HAS_SAFETY else {}),
    }


async def provider_with(config: Any, files: Any, inference: Any, models: Any, **settings: Any) -> Any:
    """A provider over the fakes with some settings changed."""
    return await get_provider_impl(config.model_copy(update=settings), stack_deps(files, inference, models))


# Builds a provider (a server of its own) over one test's fakes: `await make_provider(**settings)`.
ProviderFactory = Callable[..., Awaitable[BatchesService]]


@pytest.fixture
def kvstore_reference(tmp_path: Path) -> KVStoreReference:
    register_kvstore_backends({"kv_unit": SqliteKVStoreConfig(db_path=str(tmp_path / "kv.db"))})
    return KVStoreReference(backend="kv_unit", namespace="batches")


@pytest.fixture
async def sql_store_reference(tmp_path: Path) -> AsyncIterator[SqlStoreReference]:
    async with sql_reference("sqlite", tmp_path) as reference:
        yield reference


@pytest.fixture
def config(
    kvstore_reference: KVStoreReference, sql_store_reference: SqlStoreReference, tmp_path: Path
) -> BatchesProviderConfig:
    # No loop governor: its cap follows the test process's load, which would make request counts
    # vary from run to run; tests/unit/test_governor.py tests it on its own.
    return BatchesProviderConfig(
        kvstore=kvstore_reference,
        sql_store=sql_store_reference,
        max_concurrent_requests_per_batch=4,
        interactive_lag_target_ms=None,
        webhooks=WebhooksConfig(secrets_key_file=str(tmp_path / "webhook.key"), allowed_hosts=["127.0.0.1"]),
    )


@pytest.fixture
def replica_config(config: BatchesProviderConfig) -> BatchesProviderConfig:
    """The config of servers that share the store with others, with leases of 1 s."""
    return config.model_copy(update={"lease_seconds": 1.0})


@pytest.fixture
def make_provider(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> ProviderFactory:
    """Builds providers over the test's fakes with some settings changed; each is shut down by the test."""
    return functools.partial(provider_with, config, files, inference, models)


@pytest.fixture
def make_replica(
    replica_config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> ProviderFactory:
    """As `make_provider`, for servers that share the store with others (leases of 1 s)."""
    return functools.partial(provider_with, replica_config, files, inference, models)


@pytest.fixture
async def store(
    kvstore_reference: KVStoreReference, sql_store_reference: SqlStoreReference
) -> AsyncIterator[SQLBatchStore]:
    connector = SQLBatchStore(sql_store_reference, await kvstore_impl(kvstore_reference), kvstore_reference.namespace)
    await connector.initialize()
    yield connector
    await connector.close()


@pytest.fixture
async def provider(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> AsyncIterator[BatchesService]:
    service = await get_provider_impl(config, stack_deps(files, inference, models), [])
    yield service
    await service.shutdown()


@pytest.fixture
def idle_provider(provider: BatchesService, monkeypatch: pytest.MonkeyPatch) -> BatchesService:
    """The provider with its engine switched off, so statuses stay where the API put them."""
    monkeypatch.setattr(provider._runner, "start", lambda: None)
    return provider


@pytest.fixture
def sample_batch_data() -> dict[str, Any]:
    return {
        "input_file_id": "file-abc123",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"purpose": "unit-test"},
    }
