"""The `llama-batches` command line's file logic (llama_batches/jsonl.py): checking input files,
idempotency keys, and putting results back in input order."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_batches.jsonl import (
    InputError,
    check_input,
    endpoint_of,
    failure_summary,
    failures_in_input_order,
    idempotency_key,
    is_success,
    merge_in_input_order,
    missing_result_line,
    parse_lines,
)

URL = "/v1/chat/completions"


def request(custom_id: str, url: str = URL) -> dict[str, Any]:
    body = {"model": "local/m-chat", "messages": [{"role": "user", "content": f"question {custom_id}"}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def output_line(custom_id: str) -> str:
    response = {"status_code": 200, "request_id": f"r-{custom_id}", "body": {"object": "chat.completion"}}
    return json.dumps({"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": response, "error": None})


def error_line(custom_id: str) -> str:
    response = {"status_code": 400, "request_id": f"r-{custom_id}", "body": {"error": {"message": "bad"}}}
    return json.dumps({"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": response, "error": None})


def custom_id_of(line: str) -> str:
    return json.loads(line)["custom_id"]


# check_input


def test_a_valid_file_has_no_problems_and_blank_lines_and_a_bom_are_fine() -> None:
    content = b"\xef\xbb\xbf" + jsonl(request("a"), "", "   ", request("b")) + b"\r\n"
    assert check_input(content) == []
    assert [line["custom_id"] for line in parse_lines(content)] == ["a", "b"]


def test_a_path_is_read(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(jsonl(request("a"), "{"))
    assert (
        check_input(path)
        == check_input(str(path))
        == ["line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    )


def test_invalid_json_names_its_line_and_column() -> None:
    content = jsonl(request("a"), request("b"), '{"custom_id": "c" "method": "POST"}')
    assert check_input(content) == ["line 3: not valid JSON (Expecting ',' delimiter at column 19)"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[1, 2]", "not a JSON object"),
        (json.dumps({**request("x"), "custom_id": ""}), "custom_id must be a non-empty string"),
        (json.dumps({k: v for k, v in request("x").items() if k != "custom_id"}), "custom_id must be a non-empty"),
        (json.dumps({**request("x"), "custom_id": 7}), "custom_id must be a non-empty string"),
        (json.dumps({**request("x"), "method": "GET"}), 'method must be "POST"'),
        (json.dumps({k: v for k, v in request("x").items() if k != "url"}), "url must be a non-empty string"),
        (json.dumps({**request("x"), "body": "text"}), "body must be a JSON object"),
        ('{"custom_id": "x", "method": "POST", "url": "/v1/x", "body": {"t": NaN}}', "NaN is not a JSON number"),
    ],
)
def test_each_kind_of_bad_line_is_reported_with_its_line_number(line: str, problem: str) -> None:
    problems = check_input(jsonl(request("a"), line))
    assert len(problems) == 1
    assert problems[0].startswith("line 2: ")
    assert problem in problems[0]


def test_non_utf8_bytes_are_reported() -> None:
    assert check_input(jsonl(request("a")) + b"\n\xff\xfe{}") == ["line 2: not valid UTF-8"]


def test_a_repeated_custom_id_is_reported_at_its_second_line() -> None:
    assert check_input(jsonl(request("a"), request("b"), request("a"))) == [
        'line 3: custom_id "a" appears more than once'
    ]


def test_an_empty_file_holds_no_requests() -> None:
    assert check_input(b"") == ["the file holds no requests"]
    assert check_input(b"\n \n") == ["the file holds no requests"]


def test_only_the_first_problems_are_listed_then_how_many_more() -> None:
    problems = check_input(jsonl(*["nope"] * 12), limit=5)
    assert problems[:5] == [f"line {n}: not valid JSON (Expecting value at column 1)" for n in range(1, 6)]
    assert problems[5:] == ["7 more invalid lines"]


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    line = '{"custom_id": "x", "method": "POST", "url": "/v1/x", "body": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert check_input(line.encode()) == ["line 1: not valid JSON (nested too deeply)"]


PROBLEM = re.compile(r"line (\d+): .+|\d+ more invalid lines|the file holds no requests")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_check_input_never_raises_and_names_real_lines(content: bytes) -> None:
    problems = check_input(content)
    line_count = content.count(b"\n") + 1
    for problem in problems:
        match = PROBLEM.fullmatch(problem)
        assert match, problem
        if match.group(1):
            assert 1 <= int(match.group(1)) <= line_count


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["good", "bad", "blank"]), min_size=1, max_size=20))
def test_exactly_the_bad_lines_are_reported(kinds: list[str]) -> None:
    lines = [
        {"good": json.dumps(request(f"id-{n}")), "bad": '{"custom_id": ', "blank": ""}[kind]
        for n, kind in enumerate(kinds)
    ]
    problems = check_input("\n".join(lines).encode(), limit=len(kinds))
    bad_lines = [n for n, kind in enumerate(kinds, start=1) if kind == "bad"]
    reported = [int(PROBLEM.fullmatch(problem).group(1)) for problem in problems if problem.startswith("line ")]
    assert reported == bad_lines
    assert ("the file holds no requests" in problems) == all(kind == "blank" for kind in kinds)


# endpoint_of


def test_endpoint_is_the_url_every_line_shares() -> None:
    assert endpoint_of([request("a"), request("b")]) == URL


def test_mixed_urls_are_an_error_naming_the_request() -> None:
    with pytest.raises(InputError, match="request 3 has url '/v1/embeddings'"):
        endpoint_of([request("a"), request("b"), request("c", url="/v1/embeddings")])
    with pytest.raises(InputError):
        endpoint_of([])


# idempotency_key


def test_the_key_is_stable_and_ignores_metadata_order() -> None:
    content = jsonl(request("a"))
    first = idempotency_key(content, URL, "24h", {"a": "1", "b": "2"})
    assert first == idempotency_key(content, URL, "24h", {"b": "2", "a": "1"})
    assert first.startswith("llama-batches-")
    assert len(first) <= 256 and first.isprintable()


parameters = st.tuples(
    st.binary(max_size=64),
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]),
    st.sampled_from(["24h", "48h", "1h"]),
    st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(parameters, parameters)
def test_the_key_differs_exactly_when_content_or_a_parameter_differs(
    first: tuple[bytes, str, str, dict[str, str]], second: tuple[bytes, str, str, dict[str, str]]
) -> None:
    assert (idempotency_key(*first) == idempotency_key(*second)) == (first == second)
    assert idempotency_key(*first) == idempotency_key(*first)


@given(parameters, st.integers(min_value=0, max_value=3), st.data())
def test_changing_any_single_parameter_changes_the_key(
    base: tuple[bytes, str, str, dict[str, str]], which: int, data: st.DataObject
) -> None:
    changed = list(base)
    if which == 0:
        changed[0] = base[0] + data.draw(st.binary(min_size=1, max_size=4))
    elif which == 1:
        changed[1] = base[1] + "x"
    elif which == 2:
        changed[2] = base[2] + "x"
    else:
        changed[3] = {**base[3], "extra-key-": data.draw(st.text(max_size=3))}
    assert idempotency_key(*base) != idempotency_key(*changed)


# merge_in_input_order


def test_results_come_back_in_input_order_with_errors_and_missing_ones_in_place() -> None:
    ids = ["q1", "q2", "q3", "q4"]
    merged = merge_in_input_order(ids, [output_line("q4"), output_line("q1")], [error_line("q2")], include_errors=True)
    assert merged == [output_line("q1"), error_line("q2"), missing_result_line("q3"), output_line("q4")]
    missing = json.loads(merged[2])
    assert missing["custom_id"] == "q3" and missing["error"]["code"] == "missing_result"
    assert merge_in_input_order(ids, [output_line("q4"), output_line("q1")], [error_line("q2")], False) == [
        output_line("q1"),
        output_line("q4"),
    ]
    assert failures_in_input_order(ids, [output_line("q4"), output_line("q1")], [error_line("q2")]) == [
        error_line("q2"),
        missing_result_line("q3"),
    ]


def test_lines_the_input_does_not_hold_are_kept_at_the_end() -> None:
    merged = merge_in_input_order(["a"], [output_line("zz"), output_line("a"), "not json"], [], include_errors=True)
    assert merged == [output_line("a"), output_line("zz"), "not json"]
    # Without the input (`results` with no --input), everything comes back in file order: outputs, then errors.
    assert merge_in_input_order([], [output_line("b"), output_line("a")], [error_line("c")], True) == [
        output_line("b"),
        output_line("a"),
        error_line("c"),
    ]


custom_id_lists = st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=30)


@settings(max_examples=300, deadline=None)
@given(custom_id_lists, st.data())
def test_one_line_per_request_in_input_order_for_any_split_and_permutation(ids: list[str], data: st.DataObject) -> None:
    fates = data.draw(st.lists(st.sampled_from(["output", "error", "missing"]), min_size=len(ids), max_size=len(ids)))
    outputs = [output_line(custom_id) for custom_id, fate in zip(ids, fates, strict=True) if fate == "output"]
    errors = [error_line(custom_id) for custom_id, fate in zip(ids, fates, strict=True) if fate == "error"]
    shuffle = random.Random(data.draw(st.integers(0, 2**32)))
    shuffle.shuffle(outputs)
    shuffle.shuffle(errors)

    merged = merge_in_input_order(ids, outputs, errors, include_errors=True)
    assert [custom_id_of(line) for line in merged] == ids
    for custom_id, fate, line in zip(ids, fates, merged, strict=True):
        expected = {"output": output_line, "error": error_line, "missing": missing_result_line}[fate](custom_id)
        assert line == expected
    assert sum(is_success(line) for line in merged) == fates.count("output")

    only_outputs = merge_in_input_order(ids, outputs, errors, include_errors=False)
    assert [custom_id_of(line) for line in only_outputs] == [
        i for i, f in zip(ids, fates, strict=True) if f == "output"
    ]
    failures = failures_in_input_order(ids, outputs, errors)
    assert [custom_id_of(line) for line in failures] == [i for i, f in zip(ids, fates, strict=True) if f != "output"]
    # The two halves interleaved in input order are the whole.
    assert sorted(only_outputs + failures, key=lambda line: ids.index(custom_id_of(line))) == merged


@settings(max_examples=200, deadline=None)
@given(custom_id_lists, st.lists(st.text(max_size=20), max_size=5), st.lists(st.text(max_size=20), max_size=5))
def test_merging_never_raises_and_never_drops_a_request(
    ids: list[str], junk_out: list[str], junk_err: list[str]
) -> None:
    merged = merge_in_input_order(ids, junk_out, junk_err, include_errors=True)
    assert len(merged) >= len(ids)
    head = merged[: len(ids)]
    assert [custom_id_of(line) for line in head] == ids


def test_is_success_needs_a_2xx_response_and_no_error() -> None:
    assert is_success(output_line("a"))
    assert not is_success(error_line("a"))
    assert not is_success(missing_result_line("a"))
    assert not is_success("not json")
    assert not is_success("[]")


def test_a_failure_is_summarised_as_its_custom_id_code_and_message_in_one_line() -> None:
    no_answer = {"code": "connection_error", "message": "Connection error.\nCannot reach the model backend."}
    assert failure_summary(json.dumps({"custom_id": "a", "response": None, "error": no_answer})) == (
        "a: connection_error: Connection error. Cannot reach the model backend."
    )
    refused = {"message": "Unknown model.", "type": "invalid_request_error", "code": "model_not_found"}
    line = {"custom_id": "b", "response": {"status_code": 404, "body": {"error": refused}}, "error": None}
    assert failure_summary(json.dumps(line)) == "b: HTTP 404 model_not_found: Unknown model."
    assert failure_summary(error_line("c")) == "c: HTTP 400: bad"  # no code, no type: the status says it
    assert failure_summary(missing_result_line("d")) == (
        "d: missing_result: The batch returned no result for this request."
    )
    assert failure_summary(output_line("e")) is None


def test_a_failure_summary_is_bounded_and_never_raises() -> None:
    long_message = {"custom_id": "a", "response": None, "error": {"code": "x", "message": "word " * 1000}}
    assert len(failure_summary(json.dumps(long_message)) or "") == 300
    assert failure_summary("not json") == "an unreadable result line: not json"
    assert failure_summary("[]") == "a result line that is not a JSON object"
    text_body = {"custom_id": "f", "response": {"status_code": 502, "body": "Bad Gateway"}, "error": None}
    assert failure_summary(json.dumps(text_body)) == "f: HTTP 502: Bad Gateway"


def test_the_command_line_does_not_import_llama_stack() -> None:
    """It must run wherever the OpenAI SDK runs, against any Batch API."""
    script = "import sys, llama_batches.cli; print(sorted(m for m in sys.modules if m.startswith('llama_stack')))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
