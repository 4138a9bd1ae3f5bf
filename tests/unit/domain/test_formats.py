import json
import os
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_stack_provider_batches.domain import formats
from tests.unit.result_lines import any_text, assert_result_line, json_values


def test_success_line_has_openai_shape_with_body_as_object() -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "text": 'a "quoted"\nline'}
    text = formats.success_line('req-"1"', json.dumps(body), request_id="req_abc")
    line = json.loads(text)
    assert line["custom_id"] == 'req-"1"'
    assert line["id"].startswith("batch_req_")
    assert line["error"] is None
    assert line["response"] == {"status_code": 200, "request_id": "req_abc", "body": body}
    assert "\n" not in text


def test_http_error_line_carries_status_and_error_object() -> None:
    line = json.loads(formats.http_error_line("req-2", 400, {"message": "bad", "code": "invalid"}))
    assert line["response"]["status_code"] == 400
    assert line["response"]["request_id"].startswith("req_")
    assert line["response"]["body"] == {"error": {"message": "bad", "type": None, "param": None, "code": "invalid"}}
    assert line["error"] is None


def test_failure_line_has_no_response() -> None:
    line = json.loads(formats.failure_line("req-3", "timeout", "too slow"))
    assert line["response"] is None
    assert line["error"] == {"code": "timeout", "message": "too slow"}


def test_expired_line_uses_openais_code() -> None:
    line = json.loads(formats.expired_line("req-4"))
    assert line["response"] is None
    assert line["error"]["code"] == "batch_expired"


def test_line_ids_are_unique() -> None:
    assert len({json.loads(formats.success_line("x", "{}"))["id"] for _ in range(100)}) == 100


def test_token_usage_of_chat_and_embedding_bodies() -> None:
    assert formats.token_usage({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}) == (3, 4)
    assert formats.token_usage({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == (5, 0)
    assert formats.token_usage({}) == (0, 0)


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"prompt_tokens": "3", "completion_tokens": 4.0}, (0, 0)),
        ({"prompt_tokens": True, "completion_tokens": None}, (0, 0)),
        ({"prompt_tokens": -1, "completion_tokens": 10**5000}, (0, 0)),
        ({"prompt_tokens": {"n": 1}, "completion_tokens": [2]}, (0, 0)),
        ({"prompt_tokens": "x", "input_tokens": 6, "output_tokens": 7}, (6, 7)),
        ({"prompt_tokens": formats.MAX_TOKENS_PER_RESPONSE, "completion_tokens": 2**31}, (2**31 - 1, 0)),
        ("lots", (0, 0)),
        ([1, 2], (0, 0)),
        (None, (0, 0)),
    ],
)
def test_usage_that_is_not_a_count_counts_as_zero(usage: object, tokens: tuple[int, int]) -> None:
    assert formats.token_usage({"usage": usage}) == tokens


@settings(max_examples=200, deadline=None)
@given(
    json_values, st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens"]), json_values)
)
def test_token_usage_never_raises(body: object, usage: dict) -> None:
    for value in (body, {"usage": body}, {"usage": usage}):
        tokens = formats.token_usage(value)
        assert all(type(n) is int and 0 <= n <= formats.MAX_TOKENS_PER_RESPONSE for n in tokens)


@settings(max_examples=200, deadline=None)
@given(st.text(), any_text, json_values, json_values, st.one_of(st.none(), any_text))
def test_error_lines_are_bounded_valid_lines(
    custom_id: str, message: str, kind: object, code: object, request_id: str | None
) -> None:
    message = message * 500  # far beyond the cap
    failure = assert_result_line(formats.failure_line(custom_id, "timeout", message))
    assert failure["custom_id"] == custom_id
    assert len(failure["error"]["message"]) <= formats.MAX_MESSAGE_CHARS
    error = {"message": message, "type": kind, "param": code, "code": code}
    text = formats.http_error_line(custom_id, 400, error, request_id)
    detail = assert_result_line(text)["response"]["body"]["error"]
    assert len(detail["message"]) <= formats.MAX_MESSAGE_CHARS
    chars = formats.MAX_MESSAGE_CHARS + 4 * formats.MAX_ERROR_FIELD_CHARS + len(custom_id)
    assert len(text) <= 12 * chars + 300, "at most 12 characters of escapes per character, whatever came in"


def test_messages_keep_pairs_and_replace_lone_surrogates() -> None:
    assert formats.valid_unicode("a\ud83d\ude00b\ud800") == "a\U0001f600b\ufffd"
    line = assert_result_line(formats.failure_line("c", "internal_error", "bad \udfff"))
    assert line["error"]["message"] == "bad \ufffd"
    assert formats.clipped("x" * 5000) == "x" * (formats.MAX_MESSAGE_CHARS - 3) + "..."


def test_success_lines_escape_the_line_breaks_json_leaves_raw() -> None:
    body = {"text": "a\x85b\u2028c\u2029d\ne"}
    text = formats.success_line("c", json.dumps(body, ensure_ascii=False))
    assert assert_result_line(text)["response"]["body"] == body


def test_field_paths_are_written_as_openai_names_parameters() -> None:
    assert formats.field_path(("messages", 0, "role")) == "messages[0].role"
    assert formats.field_path(("body", "tools", 2)) == "body.tools[2]"
    assert formats.field_path(()) == ""


locations = st.lists(st.one_of(st.integers(0, 99), st.text("abc_", min_size=1, max_size=8)), max_size=4)


@given(st.lists(st.tuples(locations.map(tuple), st.text(max_size=40)), max_size=12))
def test_an_invalid_body_error_names_where_and_what_and_lists_at_most_a_few(problems: list) -> None:
    error = formats.invalid_body_error(problems)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["message"].startswith("Invalid request body: ")
    for location, message in problems[: formats.MAX_LISTED_PROBLEMS]:
        assert f"{formats.field_path(location) or 'body'}: {message}" in error["message"]
    if len(problems) > formats.MAX_LISTED_PROBLEMS:
        assert f"and {len(problems) - formats.MAX_LISTED_PROBLEMS} more" in error["message"]
    assert error["param"] == ((formats.field_path(problems[0][0]) or None) if problems else None)


def test_result_line_ids_are_unique_and_differ_in_a_forked_child() -> None:
    ids = {formats.new_request_line_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == len("batch_req_") + 32 and i.startswith("batch_req_") for i in ids)
    reader, writer = os.pipe()
    with warnings.catch_warnings():  # "multi-threaded process": the child only makes an id and exits
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # a worker process forked from this one
        os.write(writer, formats.new_request_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    from_child = os.read(reader, 100).decode()
    assert from_child.startswith("req_") and from_child != formats.new_request_id()
