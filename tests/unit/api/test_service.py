"""The API surface, called as the stack calls it (request models) and as Python callers do (keywords)."""

import asyncio
from typing import Any

import pytest

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService, get_provider_impl
from llama_stack_provider_batches.domain.errors import InvalidParameterError
from llama_stack_provider_batches.stack import (
    AccessDeniedError,
    AccessRule,
    Action,
    Api,
    BatchNotFoundError,
    CancelBatchRequest,
    ConflictError,
    CreateBatchRequest,
    ListBatchesRequest,
    RequestProviderDataContext,
    RetrieveBatchRequest,
    Scope,
    User,
)
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels
from tests.unit.helpers import chat_line, jsonl


async def test_create_returns_a_validating_batch_in_openai_shape(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    batch = await idle_provider.create_batch(CreateBatchRequest(**sample_batch_data))
    assert batch.id.startswith("batch_") and len(batch.id) == len("batch_") + 32
    assert batch.object == "batch"
    assert batch.status == "validating"
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.metadata == sample_batch_data["metadata"]
    assert batch.request_counts.total == 0
    assert await idle_provider.retrieve_batch(batch.id) == batch
    assert await idle_provider._store.waiting_ids(10) == [batch.id]  # queued to run


async def test_keyword_call_matches_request_model_call(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    by_keywords = await idle_provider.create_batch(**sample_batch_data, idem_tok="t")
    by_model = await idle_provider.create_batch(CreateBatchRequest(**sample_batch_data, idempotency_key="t"))
    assert by_keywords == by_model


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ],
)
async def test_invalid_create_is_refused_and_stores_nothing(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any], change: dict, param: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        await idle_provider.create_batch(**{**sample_batch_data, **change})
    assert info.value.param == param
    assert (await idle_provider.list_batches()).data == []


async def test_same_key_same_params_returns_the_stored_batch_whatever_its_status(
    provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    first = await provider.create_batch(**sample_batch_data, idempotency_key="k")
    await provider._runner.wait_idle()  # the file does not exist: the batch fails validation
    again = await provider.create_batch(**sample_batch_data, idempotency_key="k")
    assert again.id == first.id
    assert again.created_at == first.created_at
    assert again.status == "failed"


@pytest.mark.parametrize(
    ("param", "first", "second"),
    [
        ("input_file_id", "file-1", "file-2"),
        ("endpoint", "/v1/chat/completions", "/v1/embeddings"),
        ("metadata", {"a": "1"}, {"a": "2"}),
        ("metadata", None, {}),
        ("metadata", {}, None),
    ],
)
async def test_same_key_other_params_is_a_conflict_and_changes_nothing(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any], param: str, first: Any, second: Any
) -> None:
    original = await idle_provider.create_batch(**{**sample_batch_data, param: first}, idempotency_key="k")
    with pytest.raises(ConflictError, match="Idempotency token 'k' was previously used with different parameters"):
        await idle_provider.create_batch(**{**sample_batch_data, param: second}, idempotency_key="k")
    assert await idle_provider.retrieve_batch(original.id) == original
    assert len((await idle_provider.list_batches()).data) == 1


async def test_without_a_key_every_create_is_a_new_batch(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    ids = {(await idle_provider.create_batch(**sample_batch_data)).id for _ in range(3)}
    assert len(ids) == 3


async def test_concurrent_creates_with_one_key_store_one_batch_and_start_it_once(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    batches = await asyncio.gather(
        *(idle_provider.create_batch(**sample_batch_data, idempotency_key="race") for _ in range(50))
    )
    assert len({b.id for b in batches}) == 1
    assert len((await idle_provider.list_batches(limit=100)).data) == 1
    assert await idle_provider._store.waiting_ids(10) == [batches[0].id]


async def test_retrieve_and_cancel_of_unknown_ids_are_not_found(idle_provider: BatchesService) -> None:
    with pytest.raises(BatchNotFoundError):
        await idle_provider.retrieve_batch(RetrieveBatchRequest(batch_id="batch_nope"))
    with pytest.raises(BatchNotFoundError):
        await idle_provider.cancel_batch(CancelBatchRequest(batch_id="batch_nope"))


async def test_cancel_moves_to_cancelling_and_repeats_harmlessly(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    batch = await idle_provider.create_batch(**sample_batch_data)
    cancelling = await idle_provider.cancel_batch(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    assert await idle_provider.cancel_batch(CancelBatchRequest(batch_id=batch.id)) == cancelling


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
async def test_cancel_of_a_finished_batch_is_a_conflict(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any], status: str
) -> None:
    batch = await idle_provider.create_batch(**sample_batch_data)
    await idle_provider._store.update(batch.id, lambda b: b.model_copy(update={"status": status}))
    with pytest.raises(ConflictError, match=f"status '{status}'") as refused:
        await idle_provider.cancel_batch(batch.id)
    assert (refused.value.status_code, refused.value.code) == (409, "batch_not_cancellable")  # type: ignore[attr-defined]


async def test_an_unknown_endpoint_lists_what_a_stack_without_responses_and_safety_serves(
    config: BatchesProviderConfig, files: FakeFiles, inference: FakeInference, models: FakeModels
) -> None:
    provider = await get_provider_impl(config, {Api.files: files, Api.inference: inference, Api.models: models})
    try:
        with pytest.raises(InvalidParameterError) as refused:
            await provider.create_batch(input_file_id="file-1", endpoint="/v1/images", completion_window="24h")
        assert refused.value.message == (
            "Invalid value for 'endpoint': '/v1/images'. "
            "Supported values are: /v1/chat/completions, /v1/completions, /v1/embeddings."
        )
    finally:
        await provider.shutdown()


async def test_list_pages_newest_first(idle_provider: BatchesService, sample_batch_data: dict[str, Any]) -> None:
    created = [(await idle_provider.create_batch(**sample_batch_data)).id for _ in range(7)]
    newest_first = list(reversed(created))
    page = await idle_provider.list_batches(ListBatchesRequest(limit=3))
    assert [b.id for b in page.data] == newest_first[:3]
    assert (page.first_id, page.last_id, page.has_more) == (newest_first[0], newest_first[2], True)
    page = await idle_provider.list_batches(after=page.last_id, limit=3)
    assert [b.id for b in page.data] == newest_first[3:6]
    page = await idle_provider.list_batches(after=page.last_id, limit=3)
    assert [b.id for b in page.data] == newest_first[6:]
    assert page.has_more is False
    everything = await idle_provider.list_batches()
    assert [b.id for b in everything.data] == newest_first
    assert everything.has_more is False


async def test_list_of_nothing_and_bad_arguments(idle_provider: BatchesService) -> None:
    empty = await idle_provider.list_batches()
    assert (empty.data, empty.first_id, empty.last_id, empty.has_more) == ([], None, None, False)
    with pytest.raises(InvalidParameterError, match="limit"):
        await idle_provider.list_batches(limit=101)
    with pytest.raises(InvalidParameterError, match="after"):
        await idle_provider.list_batches(after="batch_unknown")


# --- hostile parameters: 4xx, nothing stored, the store not asked -----------------------------

HUGE = "k" * (20 * 1024 * 1024)  # 20 MB


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"idempotency_key": HUGE}, "idempotency_key"),
        ({"idempotency_key": "\ud800"}, "idempotency_key"),
        ({"input_file_id": HUGE}, "input_file_id"),
        ({"input_file_id": "file-\x00"}, "input_file_id"),
        ({"metadata": {"k": "\ud800"}}, "metadata"),
    ],
)
async def test_oversized_or_invalid_create_parameters_are_400_and_store_nothing(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any], change: dict, param: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        await idle_provider.create_batch(CreateBatchRequest(**{**sample_batch_data, **change}))
    assert info.value.param == param
    assert len(str(info.value)) < 400  # the caller's text is not echoed in full
    assert (await idle_provider.list_batches()).data == []


@pytest.fixture
def store_untouched(idle_provider: BatchesService, monkeypatch: pytest.MonkeyPatch) -> BatchesService:
    """The idle provider whose store fails the test if a batch is read, changed or paged."""

    async def no_store_call(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the store was asked")

    for method in ("get", "update_record", "page"):
        monkeypatch.setattr(idle_provider._store, method, no_store_call)
    return idle_provider


@pytest.mark.parametrize("batch_id", ["x" * 10_000, "batch_\x00", "batch_%00", "batch/../x", "\ud800", ""])
async def test_ids_that_cannot_be_ours_are_404_without_a_store_read(
    store_untouched: BatchesService, batch_id: str
) -> None:
    for call in (store_untouched.retrieve_batch, store_untouched.cancel_batch):
        with pytest.raises(BatchNotFoundError) as info:
            await call(batch_id)
        assert len(str(info.value)) < 200
        str(info.value).encode("utf-8")  # escaped: safe in the JSON answer
    with pytest.raises(BatchNotFoundError):
        await store_untouched.retrieve_batch(RetrieveBatchRequest(batch_id=batch_id))


@pytest.mark.parametrize("after", ["x" * 10_000, "batch_\x00", "\ud800"])
async def test_list_after_a_malformed_cursor_is_400_without_a_store_read(
    store_untouched: BatchesService, after: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        await store_untouched.list_batches(ListBatchesRequest(after=after))
    assert info.value.param == "after"


async def test_an_input_file_of_another_purpose_is_400_and_stores_nothing(
    idle_provider: BatchesService, files: FakeFiles, sample_batch_data: dict[str, Any]
) -> None:
    idle_provider._files = files
    file_id = files.add(jsonl([chat_line("a")]), purpose="assistants")
    with pytest.raises(InvalidParameterError) as info:
        await idle_provider.create_batch(**{**sample_batch_data, "input_file_id": file_id})
    assert (info.value.param, info.value.code) == ("input_file_id", "invalid_request")
    assert f"The input file {file_id} has purpose 'assistants'; a batch needs a file with purpose 'batch'." in str(
        info.value
    )
    assert (await idle_provider.list_batches()).data == []
    batch_file = files.add(jsonl([chat_line("a")]))
    created = await idle_provider.create_batch(**{**sample_batch_data, "input_file_id": batch_file})
    assert created.status == "validating"


async def test_an_input_file_that_cannot_be_looked_up_is_left_to_validation(
    provider: BatchesService, files: FakeFiles, sample_batch_data: dict[str, Any]
) -> None:
    provider._files = files
    batch = await provider.create_batch(**{**sample_batch_data, "input_file_id": "file-missing"})
    await provider._runner.wait_idle()
    failed = await provider.retrieve_batch(batch.id)
    assert failed.status == "failed"
    assert [e.param for e in failed.errors.data] == ["input_file_id"]


async def test_the_access_policy_may_forbid_creating_batches(
    idle_provider: BatchesService, sample_batch_data: dict[str, Any]
) -> None:
    idle_provider._policy = [
        AccessRule(forbid=Scope(actions=[Action.CREATE], resource="batch::*"), when="user with blue in teams"),
        AccessRule(permit=Scope(actions=list(Action)), when="user is owner"),
        AccessRule(permit=Scope(actions=list(Action)), when="resource is unowned"),
    ]
    with RequestProviderDataContext(user=User("bob", {"teams": ["blue"]})):
        with pytest.raises(AccessDeniedError, match="'create'"):
            await idle_provider.create_batch(**sample_batch_data, idempotency_key="k")
        assert (await idle_provider.list_batches()).data == []
    assert await idle_provider._store.waiting_ids(10) == []  # refused before anything was stored
    with RequestProviderDataContext(user=User("alice", {"teams": ["red"]})):
        batch = await idle_provider.create_batch(**sample_batch_data, idempotency_key="k")
        assert await idle_provider.retrieve_batch(batch.id) == batch
