from llama_stack_provider_batches.api.idempotency import CreateParams, conflict, same_request
from llama_stack_provider_batches.stack import BatchObject, ConflictError
from tests.unit.helpers import make_batch


def stored(metadata: dict[str, str] | None) -> BatchObject:
    return make_batch(status="completed", metadata=metadata)


def params(**change: object) -> CreateParams:
    fields = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return CreateParams(**{**fields, "metadata": None, **change})


def test_identical_parameters_are_the_same_request() -> None:
    assert same_request(stored({"a": "1", "b": "2"}), params(metadata={"b": "2", "a": "1"}))
    assert same_request(stored(None), params(metadata=None))


def test_any_difference_is_another_request() -> None:
    batch = stored({"a": "1"})
    assert not same_request(batch, params(metadata={"a": "2"}))
    assert not same_request(batch, params(metadata={"a": "1"}, input_file_id="file-2"))
    assert not same_request(batch, params(metadata={"a": "1"}, endpoint="/v1/embeddings"))
    assert not same_request(batch, params(metadata={"a": "1", "b": "2"}))


def test_none_and_empty_metadata_differ() -> None:
    assert not same_request(stored(None), params(metadata={}))
    assert not same_request(stored({}), params(metadata=None))


def test_conflict_names_the_key_and_the_differing_parameters() -> None:
    error = conflict("tok-1", stored({"a": "1"}), params(metadata={"a": "2"}, input_file_id="file-9"))
    assert isinstance(error, ConflictError)
    assert "Idempotency token 'tok-1' was previously used with different parameters" in str(error)
    assert "input_file_id" in str(error)
    assert "metadata" in str(error)
    assert "endpoint" not in str(error)
