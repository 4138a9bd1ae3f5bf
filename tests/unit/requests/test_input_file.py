import json
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.batch_error import BatchError

from llama_stack_provider_batches.domain.errors import quoted
from llama_stack_provider_batches.requests import input_file
from llama_stack_provider_batches.requests.input_file import (
    MAX_LISTED_ERRORS,
    ParsedInput,
    RequestLine,
    check_line,
    nesting_depth,
    parse_input,
)
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
    # OpenAI's sentence, then where the parser stopped
    assert parsed.errors[0].message == "This line is not parseable as valid JSON. Expecting value at column 1."


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
        ("/v1/responses", {"input": "hi"}, "body.model"),
        ("/v1/responses", {"model": "m"}, "body.input"),
        ("/v1/responses", {"model": "m", "input": {"role": "user"}}, "body.input"),
        ("/v1/moderations", {"model": "m"}, "body.input"),
        ("/v1/moderations", {"input": 7}, "body.input"),
        ("/v1/moderations", {"input": "hi", "model": ["m"]}, "body.model"),
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
    responses_line = {"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": {"stream": True}}
    assert code_of(responses_line, "/v1/responses") == "streaming_unsupported"


def test_background_mode_is_refused() -> None:
    body = {"model": "m", "input": "hi", "background": True}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": body}
    result = check_line(json.dumps(line).encode(), 1, "/v1/responses")
    assert (result.code, result.param) == ("invalid_request", "body.background")
    body["background"] = False
    assert isinstance(check_line(json.dumps(line).encode(), 1, "/v1/responses"), RequestLine)


def moderation_line(custom_id: str, text: str | list[str], model: str | None = None) -> dict:
    body: dict = {"input": text} if model is None else {"input": text, "model": model}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/moderations", "body": body}


def test_a_moderation_may_leave_its_model_to_the_stack() -> None:
    lines = [moderation_line("a", "hi"), moderation_line("b", ["x", "y"], "local/m-guard"), moderation_line("c", "z")]
    parsed = parse_input(jsonl(lines), "/v1/moderations")
    assert parsed.errors == []
    assert parsed.first_line_of_model == {None: 1, "local/m-guard": 2}
    assert parsed.index.request(0).model is None
    assert parsed.model is None  # the first line's: the stack's default, resolved when models are looked up


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(st.text(max_size=20), st.lists(st.text(max_size=20), max_size=4)),
    st.one_of(st.none(), st.text(min_size=1, max_size=20)),
    st.dictionaries(
        st.sampled_from(["instructions", "temperature", "store", "metadata"]),
        st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.dictionaries(st.text(max_size=5), st.text())),
        max_size=3,
    ),
)
def test_any_moderation_or_response_of_the_right_shape_is_accepted(
    text: str | list[str], model: str | None, extra: dict
) -> None:
    moderation = moderation_line("m", text, model)
    moderation["body"].update(extra)
    assert isinstance(check_line(json.dumps(moderation).encode(), 1, "/v1/moderations"), RequestLine)
    body = {**extra, "model": model or "local/m-chat", "input": text}
    response = {"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": body}
    assert isinstance(check_line(json.dumps(response).encode(), 1, "/v1/responses"), RequestLine)


def test_an_embeddings_batch_holds_at_most_50000_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(input_file, "MAX_EMBEDDING_INPUTS", 5)

    def embedding_line(custom_id: str, inputs: object) -> dict:
        body = {"model": "local/m-embed", "input": inputs}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}

    # A string, a list of strings and a list of token lists count their inputs; a token list is one.
    fits = [embedding_line("a", "one"), embedding_line("b", ["two", "three"]), embedding_line("c", [1, 2, 3])]
    assert parse_input(jsonl([*fits, embedding_line("d", [[1, 2]])]), "/v1/embeddings").errors == []
    too_many = parse_input(jsonl([*fits, embedding_line("d", [[1], [2]])]), "/v1/embeddings")
    assert [(e.code, e.line) for e in too_many.errors] == [("invalid_request", None)]
    assert "at most 5 inputs" in too_many.errors[0].message


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


# --- any bytes: requests or OpenAI's validation errors, never an exception (issue 11) ----------------

VALIDATION_CODES = {
    "invalid_json_line",
    "missing_required_parameter",
    "invalid_request",
    "invalid_url",
    "streaming_unsupported",
    "duplicate_custom_id",
}
ODD_CHARACTERS = ['"', "\\", "\n", "\r", "\t", "\x00", "\x85", "\u2028", "\ufeff", "\ud800", "\udfff", "\ud83d", "😀"]
any_text = st.text(st.characters(exclude_categories=()) | st.sampled_from(ODD_CHARACTERS), max_size=30)
plain_text = st.text(max_size=30)  # no surrogates
NUMBER_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"9" * 5000, b"0.5", b"1E308", b"-0", b"12"]


def request_bytes(custom_id: str, content: str, ensure_ascii: bool = True) -> bytes:
    """A chat request line; with surrogates, ASCII escapes them and raw text encodes them as invalid UTF-8."""
    text = json.dumps(chat_line(custom_id, content), ensure_ascii=ensure_ascii)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def jsonish_lines(draw: st.DrawFn) -> bytes:
    """A request line, perhaps broken: odd numbers, deep nesting, huge ids, cuts and stray bytes."""
    custom_id = draw(st.one_of(any_text, st.integers(0, 1200).map(lambda n: "x" * n)))
    line = request_bytes(custom_id, draw(any_text), draw(st.booleans()))
    kind = draw(st.sampled_from(["as is", "number", "nested", "cut", "insert", "bom"]))
    if kind == "number":
        line = line[:-1] + b', "temperature": ' + draw(st.sampled_from(NUMBER_TOKENS)) + b"}"
    elif kind == "nested":
        depth = draw(st.integers(0, 2000))
        line = line[:-1] + b', "deep": ' + b"[" * depth + b"]" * draw(st.integers(0, depth)) + b"}"
    elif kind == "cut":
        line = line[: draw(st.integers(0, len(line)))]
    elif kind == "insert":
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.binary(max_size=8)) + line[at:]
    elif kind == "bom":
        line = b"\xef\xbb\xbf" + line
    return line


@st.composite
def input_files(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.one_of(jsonish_lines(), st.binary(max_size=40), st.sampled_from([b"", b"  ", b"\r"]))))
    separator = draw(st.sampled_from([b"\n", b"\r\n"]))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + separator.join(lines)


def assert_requests_or_validation_errors(content: bytes) -> ParsedInput:
    parsed = parse_input(content, CHAT)
    assert isinstance(parsed, ParsedInput)
    if parsed.errors:
        assert len(parsed.errors) <= MAX_LISTED_ERRORS + 1
        for error in parsed.errors:
            assert isinstance(error, BatchError)
            assert error.code in VALIDATION_CODES
            assert len(error.message) <= 300, "messages never echo unbounded caller text"
            error.message.encode("utf-8")
        return parsed
    assert len(parsed.index) > 0
    for position in range(len(parsed.index)):
        request = parsed.index.request(position)
        json.dumps({"custom_id": request.custom_id, "body": request.body}, ensure_ascii=False).encode("utf-8")
    return parsed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_requests_or_validation_errors(content: bytes) -> None:
    assert_requests_or_validation_errors(content)


@settings(max_examples=200, deadline=None)
@given(input_files())
def test_any_jsonish_file_gives_requests_or_validation_errors(content: bytes) -> None:
    assert_requests_or_validation_errors(content)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(plain_text, min_size=1, max_size=5),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.booleans(),
)
def test_valid_requests_are_accepted_whatever_their_text(
    contents: list[str], separator: bytes, bom: bool, ensure_ascii: bool
) -> None:
    lines = [request_bytes(f"r{n}", text, ensure_ascii) for n, text in enumerate(contents)]
    parsed = assert_requests_or_validation_errors((b"\xef\xbb\xbf" if bom else b"") + separator.join(lines))
    assert parsed.errors == []
    assert [parsed.index.request(n).body["messages"][0]["content"] for n in range(len(contents))] == contents


def errors_of(content: bytes) -> list[tuple[str, int | None]]:
    return [(e.code, e.line) for e in parse_input(content, CHAT).errors]


def test_a_line_nested_1500_deep_is_refused_not_raised() -> None:
    deep = b'{"custom_id": "d", "deep": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    parsed = parse_input(jsonl([chat_line("a")]) + b"\n" + deep, CHAT)
    assert [(e.code, e.line) for e in parsed.errors] == [("invalid_json_line", 2)]
    assert str(input_file.MAX_JSON_DEPTH) in parsed.errors[0].message
    unclosed = b"[" * 100_000
    assert errors_of(unclosed) == [("invalid_json_line", 1)]


def nested_line(depth: int) -> bytes:
    """A request whose deepest value is `depth` objects and arrays deep (the line and its body are two)."""
    line = chat_line("a")
    line["body"]["metadata"] = json.loads("[" * (depth - 2) + "]" * (depth - 2))
    return json.dumps(line).encode()


def test_nesting_is_allowed_up_to_the_limit() -> None:
    assert errors_of(nested_line(input_file.MAX_JSON_DEPTH)) == []
    assert errors_of(nested_line(input_file.MAX_JSON_DEPTH + 1)) == [("invalid_json_line", 1)]


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    return 1 + max(map(depth_of, value), default=0) if isinstance(value, list) else 0


bracket_text = st.text(st.sampled_from(['"', "\\", "[", "]", "{", "}", "a", "\n", "\u2028"]), max_size=12)
nested_values = st.recursive(
    st.none() | st.integers() | bracket_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(bracket_text, children, max_size=3),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(nested_values, st.booleans())
def test_the_depth_scan_is_exact_on_valid_json(value: object, ensure_ascii: bool) -> None:
    assert nesting_depth(json.dumps(value, ensure_ascii=ensure_ascii).encode()) == depth_of(value)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert errors_of(jsonl([chat_line("a", content='[{"\\' * 500)])) == []
    assert nesting_depth(b'{"a": "[[[\\"[[", "b": [[]]}') == 3
    assert nesting_depth(b'["\\\\", ["\\\\\\"[", [[]]]]') == 4
    assert nesting_depth(b"") == 0


def test_a_byte_order_mark_starts_a_file_but_nowhere_else() -> None:
    parsed = parse_input(b"\xef\xbb\xbf" + jsonl([chat_line("a"), chat_line("b")]), CHAT)
    assert parsed.errors == []
    assert parsed.index.request(0).custom_id == "a"
    assert errors_of(jsonl([chat_line("a")]) + b"\n\xef\xbb\xbf" + jsonl([chat_line("b")])) == [
        ("invalid_json_line", 2)
    ]


def test_crlf_and_blank_lines_are_accepted_and_counted() -> None:
    content = b"\r\n".join([json.dumps(chat_line("a")).encode(), b"", b"   \t", json.dumps(chat_line("b")).encode()])
    parsed = parse_input(content + b"\r\n\r\n", CHAT)
    assert parsed.errors == []
    assert [(parsed.index.request(n).custom_id, parsed.index.request(n).line) for n in range(2)] == [("a", 1), ("b", 4)]


def test_other_encodings_are_not_utf8() -> None:
    parsed = parse_input(json.dumps(chat_line("a")).encode("utf-16"), CHAT)
    assert [(e.code, e.message) for e in parsed.errors] == [("invalid_json_line", "This line is not valid UTF-8.")]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" * 5000])
def test_non_standard_numbers_are_refused(number: bytes) -> None:
    line = json.dumps(chat_line("a")).encode()[:-1] + b', "temperature": ' + number + b"}"
    parsed = parse_input(line, CHAT)
    assert [(e.code, e.line) for e in parsed.errors] == [("invalid_json_line", 1)]
    assert len(parsed.errors[0].message) < 300


def test_large_finite_numbers_are_accepted() -> None:
    line = json.dumps(chat_line("a")).encode()[:-1] + b', "temperature": 1E308, "seed": ' + b"9" * 100 + b"}"
    assert errors_of(line) == []


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ude00\\ud83d", "x\\uD83Dy"])
def test_lone_surrogate_escapes_are_refused(escape: str) -> None:
    line = json.dumps(chat_line("a", content="@")).replace("@", escape).encode()
    parsed = parse_input(line, CHAT)
    assert [(e.code, e.line) for e in parsed.errors] == [("invalid_json_line", 1)]
    assert "not valid Unicode" in parsed.errors[0].message
    in_a_key = b'{"\\ud800": 1, ' + json.dumps(chat_line("b")).encode()[1:]
    assert errors_of(in_a_key) == [("invalid_json_line", 1)]


def test_a_surrogate_pair_escape_is_one_character() -> None:
    line = json.dumps(chat_line("\U0001f600", content="\U0001f600"))
    assert "\\ud83d\\ude00" in line
    parsed = parse_input(line.encode(), CHAT)
    assert parsed.errors == []
    request = parsed.index.request(0)
    assert (request.custom_id, request.body["messages"][0]["content"]) == ("\U0001f600", "\U0001f600")
    assert errors_of(json.dumps(chat_line("a", content="\\ud800")).encode()) == [], (
        "an escaped backslash, not an escape"
    )


def test_custom_id_length() -> None:
    assert errors_of(json.dumps(chat_line("x" * input_file.MAX_CUSTOM_ID_CHARS)).encode()) == []
    for custom_id in ["", "x" * (input_file.MAX_CUSTOM_ID_CHARS + 1)]:
        result = check_line(json.dumps(chat_line(custom_id)).encode(), 1, CHAT)
        assert (result.code, result.param) == ("invalid_request", "custom_id")


def test_messages_quote_caller_text_cut_short() -> None:
    long_id = "y" * input_file.MAX_CUSTOM_ID_CHARS
    parsed = parse_input(jsonl([chat_line(long_id), chat_line(long_id)]), CHAT)
    assert parsed.errors[0].code == "duplicate_custom_id"
    assert len(parsed.errors[0].message) < 200
    result = check_line(json.dumps({**chat_line("a"), "url": "/v1/" + "z" * 100_000}).encode(), 1, CHAT)
    assert result.code == "invalid_url" and len(result.message) < 200
    assert quoted("/v1/" + "z" * 100_000) in result.message  # the project's one quoting helper


def test_a_line_that_cannot_be_checked_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes, line: int, endpoint: str) -> RequestLine:
        raise KeyError("a bug")

    monkeypatch.setattr(input_file, "check_line", broken)
    assert errors_of(jsonl([chat_line("a"), chat_line("b")])) == [("invalid_json_line", 1), ("invalid_json_line", 2)]


def test_an_unsupported_endpoint_is_a_file_error() -> None:
    parsed = parse_input(jsonl([chat_line("a")]), "/v1/images/generations")
    assert [(e.code, e.param, e.line) for e in parsed.errors] == [("invalid_request", "endpoint", None)]
