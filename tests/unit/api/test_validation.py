"""Checks of what callers send: OpenAI's rules, and a bound on every field a caller controls."""

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_stack_provider_batches.api.validation import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_INPUT_FILE_ID_CHARS,
    SUPPORTED_ENDPOINTS,
    validate_create_params,
    validate_idempotency_key,
    validate_input_file_id,
    validate_input_file_purpose,
    validate_list_after,
    validate_list_limit,
    validate_metadata,
    validate_output_expires_after,
)
from llama_stack_provider_batches.domain.errors import MAX_QUOTED_CHARS, InvalidParameterError, quoted, shown
from llama_stack_provider_batches.domain.records import MAX_BATCH_ID_CHARS, is_batch_id
from llama_stack_provider_batches.stack import OpenAIFilePurpose

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
        ({"metadata": {"k": 1}}, "metadata.k"),
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


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (["a", "b"], "an array"),
        ({"x": "y"}, "an object"),
        (1, "an integer"),
        (1.5, "a decimal"),
        (True, "a boolean"),
        (None, "null"),
    ],
)
def test_a_metadata_value_of_another_type_is_named_by_its_key_as_openai_does(value: Any, got: str) -> None:
    with pytest.raises(InvalidParameterError) as refused:
        validate_metadata({"source": "cli", "tags": value})
    assert (refused.value.param, refused.value.code) == ("metadata.tags", "invalid_type")
    assert refused.value.message == f"Invalid type for 'metadata.tags': expected a string, but got {got} instead."


def test_metadata_that_is_not_an_object_and_a_long_or_odd_key_are_named_without_echoing_values() -> None:
    with pytest.raises(InvalidParameterError) as refused:
        validate_metadata(["tags", "a"])
    assert (refused.value.param, refused.value.code) == ("metadata", "invalid_type")
    assert refused.value.message == "Invalid type for 'metadata': expected an object, but got an array instead."
    with pytest.raises(InvalidParameterError) as refused:
        validate_metadata({"k" * 1000 + "\n": 1})
    assert refused.value.param == f"metadata.{'k' * MAX_QUOTED_CHARS}..."  # bounded, as every quote of caller text


def test_an_unknown_endpoint_is_refused_with_the_endpoints_this_stack_serves() -> None:
    served = ("/v1/chat/completions", "/v1/embeddings")
    with pytest.raises(InvalidParameterError) as refused:
        validate_create_params(**{**GOOD, "endpoint": "/v1/images/generations"}, served_endpoints=served)
    assert refused.value.message == (
        "Invalid value for 'endpoint': '/v1/images/generations'. "
        "Supported values are: /v1/chat/completions, /v1/embeddings."
    )
    validate_create_params(**{**GOOD, "endpoint": "/v1/moderations"}, served_endpoints=served)  # the caller's to refuse


@pytest.mark.parametrize("limit", [1, 20, 100])
def test_list_limits_in_range_pass(limit: int) -> None:
    assert validate_list_limit(limit) == limit


@pytest.mark.parametrize("limit", [0, -1, 101, True, "5"])
def test_list_limits_out_of_range_fail(limit: object) -> None:
    with pytest.raises(InvalidParameterError, match="limit"):
        validate_list_limit(limit)


# --- every caller-controlled field is bounded ---------------------------------------------------

HUGE = "x" * (20 * 1024 * 1024)  # 20 MB


def refused(check: Callable[[], object], param: str) -> InvalidParameterError:
    """The error `check` raises, after asserting it names `param` and stays short and encodable."""
    with pytest.raises(InvalidParameterError) as info:
        check()
    assert info.value.param == param
    message = str(info.value)
    assert len(message) < 400  # quotes at most MAX_QUOTED_CHARS of caller text
    message.encode("utf-8")  # a lone surrogate would make the stack's JSON response fail
    return info.value


@pytest.mark.parametrize("file_id", ["file-1", "file-" + "a" * (MAX_INPUT_FILE_ID_CHARS - 5), "file_~!#"])
def test_input_file_ids_of_printable_ascii_pass(file_id: str) -> None:
    validate_input_file_id(file_id)


@pytest.mark.parametrize(
    "file_id", ["f" * (MAX_INPUT_FILE_ID_CHARS + 1), HUGE, "file 1", "file-1\n", "file-\x00", "fïle", "file-\ud800"]
)
def test_input_file_ids_too_long_or_malformed_are_400(file_id: str) -> None:
    error = refused(lambda: validate_create_params(**{**GOOD, "input_file_id": file_id}), "input_file_id")
    assert error.code == "invalid_value"


@pytest.mark.parametrize("key", [None, "k", "k" * MAX_IDEMPOTENCY_KEY_CHARS, "nightly eval 2026-11-29", "clé-日本"])
def test_idempotency_keys_within_bounds_pass(key: str | None) -> None:
    validate_idempotency_key(key)


@pytest.mark.parametrize(
    "key", ["", "k" * (MAX_IDEMPOTENCY_KEY_CHARS + 1), HUGE, "a\x00b", "a\nb", "tab\t", "\ud800", "a\u200bb", 5, ["k"]]
)
def test_idempotency_keys_empty_long_or_unprintable_are_400(key: object) -> None:
    refused(lambda: validate_idempotency_key(key), "idempotency_key")


@pytest.mark.parametrize("metadata", [{"k": "\ud800"}, {"\udfff": "v"}, {"k": "ok", "k2": "a\ud83d"}, {"k": HUGE}])
def test_metadata_with_invalid_unicode_or_oversized_is_400(metadata: dict) -> None:
    refused(lambda: validate_metadata(metadata), "metadata")


def test_metadata_may_hold_any_valid_unicode() -> None:
    validate_metadata({"emoji": "\U0001f600", "newline": "a\nb", "nul": "a\x00b"})  # stored escaped in JSON


@pytest.mark.parametrize("batch_id", ["batch_0123456789abcdef0123456789abcdef", "batch_nope", "b" * MAX_BATCH_ID_CHARS])
def test_ids_that_may_name_a_batch(batch_id: str) -> None:
    assert is_batch_id(batch_id)
    assert validate_list_after(batch_id) == batch_id


@pytest.mark.parametrize(
    "batch_id",
    ["", "b" * (MAX_BATCH_ID_CHARS + 1), "x" * 10_000, "batch_\x00", "batch_%00", "batch/..", "batch_ä", "\ud800", 7],
)
def test_ids_that_cannot_name_a_batch(batch_id: object) -> None:
    assert not is_batch_id(batch_id)
    refused(lambda: validate_list_after(batch_id), "after")


def test_list_after_may_be_omitted() -> None:
    assert validate_list_after(None) is None


def test_a_file_of_another_purpose_is_refused_naming_input_file_id() -> None:
    validate_input_file_purpose("file-1", "batch")
    validate_input_file_purpose("file-1", OpenAIFilePurpose.BATCH)
    error = refused(lambda: validate_input_file_purpose("file-1", OpenAIFilePurpose.ASSISTANTS), "input_file_id")
    assert error.code == "invalid_request"
    assert "The input file file-1 has purpose 'assistants'; a batch needs a file with purpose 'batch'." in str(error)


def test_quoted_caller_text_is_short_escaped_and_never_raises() -> None:
    assert quoted("abc") == "'abc'"
    assert quoted(HUGE) == "'" + "x" * MAX_QUOTED_CHARS + "...'"
    assert quoted("a\x00\ud800") == "'a\\x00\\ud800'"
    assert quoted(5) == "5" and quoted(None) == "None"
    assert quoted(10**5000) == "a number too long to show"
    assert quoted({"k": HUGE}) == "a value of type dict"
    assert shown("batch_\x00") == "batch_\\x00"


# Text with the characters hostile callers use (lone surrogates, NUL, newlines) among arbitrary ones.
hostile_text = st.text(
    st.one_of(st.characters(exclude_categories=()), st.sampled_from(["\ud800", "\udfff", "\x00", "\n", " ", "_", "a"])),
    max_size=300,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=20),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    file_id=json_values,
    endpoint=st.one_of(json_values, st.sampled_from(SUPPORTED_ENDPOINTS)),
    window=st.one_of(json_values, st.just("24h")),
    metadata=st.one_of(json_values, st.dictionaries(hostile_text, hostile_text, max_size=20)),
    key=json_values,
    after=json_values,
    limit=json_values,
    purpose=json_values,
)
def test_validators_pass_or_raise_invalid_parameter_error_only(
    file_id: Any, endpoint: Any, window: Any, metadata: Any, key: Any, after: Any, limit: Any, purpose: Any
) -> None:
    checks: list[Callable[[], object]] = [
        lambda: validate_create_params(file_id, endpoint, window, metadata),
        lambda: validate_input_file_id(file_id),
        lambda: validate_metadata(metadata),
        lambda: validate_idempotency_key(key),
        lambda: validate_list_after(after),
        lambda: validate_list_limit(limit),
        lambda: validate_input_file_purpose("file-1", purpose),
        lambda: is_batch_id(after),
    ]
    for check in checks:
        try:
            check()
        except InvalidParameterError as error:
            str(error).encode("utf-8")  # the message is always safe to send back
            assert len(str(error)) < 400


@given(st.integers(-(10**9), 10**9))
def test_output_expiry_seconds_pass_exactly_within_openais_bounds(seconds: int) -> None:
    value = {"anchor": "created_at", "seconds": seconds}
    if 3600 <= seconds <= 2592000:
        assert validate_output_expires_after(value) == seconds
    else:
        with pytest.raises(InvalidParameterError) as refused:
            validate_output_expires_after(value)
        assert refused.value.param == "output_expires_after.seconds"
        assert refused.value.code in ("integer_below_min_value", "integer_above_max_value")


@given(
    st.one_of(st.none(), st.text(), st.integers(), st.lists(st.integers()), st.dictionaries(st.text(), st.integers()))
)
def test_any_output_expiry_is_accepted_or_refused_naming_a_parameter(value: object) -> None:
    try:
        validate_output_expires_after(value)
    except InvalidParameterError as refused:
        assert refused.param.startswith("output_expires_after") and refused.code
