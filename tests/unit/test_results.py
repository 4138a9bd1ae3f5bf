import json

from llama_stack_provider_batches import formats
from llama_stack_provider_batches.results import (
    ResultEntry,
    Tally,
    assemble_result_files,
    decode_results,
    encode_results,
)


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


def test_assembly_orders_by_position_and_splits_the_files() -> None:
    chunks = [encode_results([success(2), failure(1)]), encode_results([success(0)])]
    files = assemble_result_files(chunks, extra=[failure(3)])
    assert (files.completed, files.failed) == (2, 2)
    output = [json.loads(line) for line in files.output.decode().splitlines()]
    errors = [json.loads(line) for line in files.error.decode().splitlines()]
    assert [line["custom_id"] for line in output] == ["c0", "c2"]
    assert [line["custom_id"] for line in errors] == ["c1", "c3"]
    assert files.output.endswith(b"\n")


def test_no_successes_means_no_output_file() -> None:
    files = assemble_result_files([encode_results([failure(0)])])
    assert files.output is None
    assert files.error is not None
    assert assemble_result_files([]).error is None


def test_tally_counts_and_sums_usage() -> None:
    tally = Tally.of([success(0, 5, 7), success(1, 1, 1), failure(2)])
    assert tally.counts(total=4).model_dump() == {"total": 4, "completed": 2, "failed": 1}
    usage = tally.usage()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (6, 8, 14)
