import pytest

from llama_stack_provider_batches.validation import (
    InvalidParameterError,
    validate_create_params,
    validate_list_limit,
    validate_metadata,
)

GOOD = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": None}


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_supported_endpoints_pass(endpoint: str) -> None:
    validate_create_params(**{**GOOD, "endpoint": endpoint})


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint"),
        ({"endpoint": "chat/completions"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"input_file_id": ""}, "input_file_id"),
        ({"input_file_id": None}, "input_file_id"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
def test_bad_create_params_name_the_param(change: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        validate_create_params(**{**GOOD, **change})
    assert info.value.param == param
    assert param in str(info.value)
    assert isinstance(info.value, ValueError)  # the stack answers ValueError with HTTP 400


def test_metadata_limits_are_openais() -> None:
    validate_metadata({f"k{i}": "v" for i in range(16)})
    validate_metadata({"k" * 64: "v" * 512})
    validate_metadata({})
    for bad in (
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": None},
        ["k", "v"],
    ):
        with pytest.raises(InvalidParameterError):
            validate_metadata(bad)


@pytest.mark.parametrize("limit", [1, 20, 100])
def test_list_limits_in_range_pass(limit: int) -> None:
    assert validate_list_limit(limit) == limit


@pytest.mark.parametrize("limit", [0, -1, 101, True, "5"])
def test_list_limits_out_of_range_fail(limit: object) -> None:
    with pytest.raises(InvalidParameterError, match="limit"):
        validate_list_limit(limit)
