import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_stack_provider_batches.domain import formats
from llama_stack_provider_batches.domain.results import (
    ResultEntry,
    ResultSpool,
    Tally,
    decode_results,
    encode_results,
    success_tokens,
)
from tests.unit.result_lines import any_text, json_values


def success(position: int, prompt_tokens: int = 2, completion_tokens: int = 3) -> ResultEntry:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    body = json.dumps({"object": "chat.completion", "text": "tab\there\nnewline", "usage": usage})
    return ResultEntry(position, True, formats.success_line(f"c{position}", body))


def failure(position: int) -> ResultEntry:
    return ResultEntry(position, False, formats.failure_line(f"c{position}", "timeout", "slow"))


def test_chunks_round_trip_even_with_tabs_and_newlines_in_answers() -> None:
    entries = [success(3), failure(0), success(7)]
    text = encode_results(entries)
    assert text.count("\n") == 3
    assert decode_results(text) == entries
    assert decode_results("") == []


def test_files_are_written_in_position_order_and_split() -> None:
    entries = [success(2), failure(1), success(0), failure(3)]
    spool, output, error = ResultSpool(5, io.BytesIO()), io.BytesIO(), io.BytesIO()
    spool.add(entries[:2])
    spool.add(entries[2:])
    assert spool.write_files(output, error) == (2, 2)
    assert [json.loads(line)["custom_id"] for line in output.getvalue().splitlines()] == ["c0", "c2"]
    assert [json.loads(line)["custom_id"] for line in error.getvalue().splitlines()] == ["c1", "c3"]
    assert output.getvalue().endswith(b"\n")


def test_no_successes_writes_nothing_to_the_output_file() -> None:
    spool, output, error = ResultSpool(1, io.BytesIO()), io.BytesIO(), io.BytesIO()
    spool.add([failure(0)])
    assert spool.write_files(output, error) == (0, 1)
    assert output.getvalue() == b""


def test_a_position_added_twice_keeps_its_first_line() -> None:
    spool, output, error = ResultSpool(1, io.BytesIO()), io.BytesIO(), io.BytesIO()
    spool.add([success(0)])
    spool.add([failure(0)])
    assert spool.write_files(output, error) == (1, 0)
    assert error.getvalue() == b""


def test_tally_counts_and_sums_usage() -> None:
    tally = Tally.of([success(0, 5, 7), success(1, 1, 1), failure(2)])
    assert tally.counts(total=4).model_dump() == {"total": 4, "completed": 2, "failed": 1}
    usage = tally.usage()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (6, 8, 14)


def test_lines_holding_raw_unicode_line_breaks_round_trip() -> None:
    entries = [ResultEntry(0, True, '{"text":"a\u2028b\x85c\x1ed"}'), failure(1)]
    assert decode_results(encode_results(entries)) == entries


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        any_text, json_values.map(json.dumps), json_values.map(lambda v: formats.success_line("c", json.dumps(v)))
    )
)
def test_tally_never_fails_on_a_stored_line(line_json: str) -> None:
    tally = Tally.of([ResultEntry(0, True, line_json), failure(1)])
    assert (tally.completed, tally.failed) == (1, 1)
    assert tally.input_tokens >= 0 and tally.output_tokens >= 0


def test_unreadable_success_lines_count_no_tokens() -> None:
    huge = formats.success_line("c", '{"usage":{"prompt_tokens":2},"n":' + "9" * 5000 + "}")
    assert success_tokens(huge) == (0, 0)
    assert success_tokens("not json") == (0, 0)
    assert success_tokens('{"response": {"body": [1]}}') == (0, 0)
    assert success_tokens('{"response": {"body": {"usage": {"prompt_tokens": "2", "completion_tokens": 3}}}}') == (0, 3)
