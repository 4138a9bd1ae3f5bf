import json
from array import array

import pytest

from llama_stack_provider_batches import input_file
from llama_stack_provider_batches.input_file import MAX_LISTED_ERRORS, RequestLine, check_line, parse_input
from tests.unit.helpers import chat_line, jsonl

CHAT = "/v1/chat/completions"


def code_of(line: dict | bytes, endpoint: str = CHAT) -> str:
    raw = line if isinstance(line, bytes) else json.dumps(line).encode()
    result = check_line(raw, 1, endpoint)
    assert not isinstance(result, RequestLine), "expected an error"
    return result.code


def test_valid_lines_become_requests_in_order() -> None:
    parsed = parse_input(jsonl([chat_line("a"), chat_line("b")]) + b"\n\n", CHAT)
    assert parsed.errors == []
    requests = [parsed.index.request(position) for position in range(len(parsed.index))]
    assert [(r.custom_id, r.line) for r in requests] == [("a", 1), ("b", 2)]
    assert requests[1].body == chat_line("b")["body"]
    assert parsed.first_line_of_model == {"local/m-chat": 1}


def test_the_index_keeps_offsets_not_parsed_lines() -> None:
    parsed = parse_input(jsonl([chat_line(f"r{i}") for i in range(1000)]), CHAT)
    assert len(parsed.index) == 1000
    assert {type(value) for value in vars(parsed.index).values()} == {bytes, array}


def test_more_than_the_request_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(input_file, "MAX_REQUESTS", 5)
    parsed = parse_input(jsonl([chat_line(f"r{i}") for i in range(6)]), CHAT)
    assert [(e.param, e.line) for e in parsed.errors] == [("input_file_id", None)]
    assert "more than 5 requests" in parsed.errors[0].message


def test_more_than_the_size_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(input_file, "MAX_FILE_BYTES", 100)
    parsed = parse_input(jsonl([chat_line(f"r{i}") for i in range(6)]), CHAT)
    assert "larger than" in parsed.errors[0].message


def test_blank_lines_are_skipped_but_counted_for_line_numbers() -> None:
    content = json.dumps(chat_line("a")).encode() + b"\n\n" + b"not json"
    parsed = parse_input(content, CHAT)
    assert [(e.code, e.line) for e in parsed.errors] == [("invalid_json_line", 3)]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (b"[1, 2]", "invalid_json_line"),
        (b'"\xff\xfe"', "invalid_json_line"),
    ],
)
def test_unreadable_lines(raw: bytes, code: str) -> None:
    assert code_of(raw) == code


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
def test_missing_top_level_fields(field: str) -> None:
    line = chat_line("a")
    del line[field]
    result = check_line(json.dumps(line).encode(), 7, CHAT)
    assert (result.code, result.param, result.line) == ("missing_required_parameter", field, 7)


@pytest.mark.parametrize(
    ("change", "code", "param"),
    [
        ({"custom_id": 5}, "invalid_request", "custom_id"),
        ({"body": "text"}, "invalid_request", "body"),
        ({"method": "GET"}, "invalid_request", "method"),
        ({"url": "/v1/embeddings"}, "invalid_url", "url"),
    ],
)
def test_wrong_top_level_values(change: dict, code: str, param: str) -> None:
    result = check_line(json.dumps({**chat_line("a"), **change}).encode(), 1, CHAT)
    assert (result.code, result.param) == (code, param)


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (CHAT, {"messages": []}, "body.model"),
        (CHAT, {"model": "m"}, "body.messages"),
        (CHAT, {"model": 3, "messages": []}, "body.model"),
        (CHAT, {"model": "m", "messages": "hi"}, "body.messages"),
        ("/v1/completions", {"model": "m"}, "body.prompt"),
        ("/v1/embeddings", {"model": "m", "input": 4}, "body.input"),
    ],
)
def test_body_fields_per_endpoint(endpoint: str, body: dict, param: str) -> None:
    line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": body}
    result = check_line(json.dumps(line).encode(), 1, endpoint)
    assert (result.code, result.param) == ("invalid_request", param)


def test_streaming_is_refused() -> None:
    line = chat_line("a")
    line["body"]["stream"] = True
    assert code_of(line) == "streaming_unsupported"


def test_duplicate_custom_id() -> None:
    parsed = parse_input(jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), CHAT)
    assert [(e.code, e.line) for e in parsed.errors] == [("duplicate_custom_id", 3)]


def test_empty_file_is_an_error() -> None:
    parsed = parse_input(b"\n  \n", CHAT)
    assert [e.param for e in parsed.errors] == ["input_file_id"]
    assert "empty" in parsed.errors[0].message


def test_listed_errors_are_capped_with_a_count_of_the_rest() -> None:
    parsed = parse_input(b"\n".join([b"bad"] * (MAX_LISTED_ERRORS + 25)), CHAT)
    assert len(parsed.errors) == MAX_LISTED_ERRORS + 1
    assert "25 more" in parsed.errors[-1].message
