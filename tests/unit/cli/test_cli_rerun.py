"""Which requests `llama-batches rerun` runs again, and the output it combines (llama_batches/rerun.py)."""

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from llama_batches import jsonl
from llama_batches.rerun import combine, foreign_results, select, why_run_again
from tests.processes import llama_batches
from tests.unit.cli.conftest import FakeBatchAPI, batch_body

# Kinds of result a request may have, with whether a re-run takes it up.
KINDS = {
    "ok": False,
    "http_400": False,
    "http_404": False,
    "http_500": True,
    "http_503": True,
    "http_429": True,
    "http_408": True,
    "batch_expired": True,
    "batch_cancelled": True,
    "timeout": True,
    "connection_error": True,
    "invalid_response": False,
    "internal_error": False,
    "input_file_unavailable": True,
    "no_line": True,
}


def result_line(custom_id: str, kind: str, tag: str = "first") -> str:
    if kind == "ok":
        response = {"status_code": 200, "body": {"tag": tag}}
        return json.dumps({"id": "r", "custom_id": custom_id, "response": response, "error": None})
    if kind.startswith("http_"):
        response = {"status_code": int(kind[5:]), "body": {"error": {"message": "no", "tag": tag}}}
        return json.dumps({"id": "r", "custom_id": custom_id, "response": response, "error": None})
    error = {"code": kind, "message": tag}
    return json.dumps({"id": None, "custom_id": custom_id, "response": None, "error": error})


def input_file(custom_ids: list[str]) -> bytes:
    lines = [
        {"custom_id": c, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}} for c in custom_ids
    ]
    return "".join(json.dumps(line) + "\r\n" for line in lines).encode()  # CRLF: kept as written


runs = st.lists(
    st.tuples(st.text(st.characters(codec="utf-8"), min_size=1, max_size=12), st.sampled_from(sorted(KINDS))),
    min_size=1,
    max_size=30,
    unique_by=lambda pair: pair[0],
)


def first_results(run: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    outputs = [result_line(c, k) for c, k in run if k == "ok"]
    errors = [result_line(c, k) for c, k in run if k not in ("ok", "no_line")]
    return outputs, errors


@given(run=runs)
def test_exactly_the_requests_a_retry_may_cure_run_again_as_written_in_input_order(run: list[tuple[str, str]]) -> None:
    content = input_file([c for c, _ in run])
    selection = select(content, *first_results(run))
    assert selection.again == [c for c, kind in run if KINDS[kind]]
    raw = dict(zip([c for c, _ in run], jsonl.request_lines(content), strict=True))
    assert selection.lines == [raw[c] for c in selection.again]
    assert sum(selection.reasons.values()) == len(selection.again)
    assert jsonl.parse_lines(selection.input_file()) == [
        line for line in jsonl.parse_lines(content) if line["custom_id"] in set(selection.again)
    ]


@given(run=runs, answered=st.data())
def test_the_combined_output_has_every_request_once_in_input_order_with_the_newer_answer(
    run: list[tuple[str, str]], answered: st.DataObject
) -> None:
    custom_ids = [c for c, _ in run]
    first = first_results(run)
    selection = select(input_file(custom_ids), *first)
    # The new batch answers some of what it ran (the rest expired again, or is missing).
    new_kinds = {
        c: answered.draw(st.sampled_from(["ok", "http_400", "batch_expired", "no_line"])) for c in selection.again
    }
    new = (
        [result_line(c, k, "new") for c, k in new_kinds.items() if k == "ok"],
        [result_line(c, k, "new") for c, k in new_kinds.items() if k not in ("ok", "no_line")],
    )
    merged = jsonl.merge_in_input_order(custom_ids, *combine(selection.again, first, new), include_errors=True)
    assert [json.loads(line)["custom_id"] for line in merged] == custom_ids
    for (custom_id, kind), line in zip(run, merged, strict=True):
        expected = new_kinds.get(custom_id, "no_line")
        if custom_id in new_kinds and expected != "no_line":
            assert "new" in line and why_run_again(line) == why_run_again(result_line(custom_id, expected))
        elif kind != "no_line":
            assert line in (result_line(custom_id, kind),)  # the first batch's result stands
        else:
            assert json.loads(line)["error"]["code"] == "missing_result"


def test_a_result_line_nobody_can_read_counts_as_none() -> None:
    assert why_run_again("{not json") == "without a result"
    assert why_run_again(json.dumps({"custom_id": "a", "response": {"status_code": "x"}})) == "without a result"
    assert why_run_again(result_line("a", "credentials_unavailable")) == "credentials unavailable"
    assert why_run_again(result_line("a", "http_422")) is None


def test_results_of_another_input_are_told_apart() -> None:
    ids = ["a", "b"]
    assert foreign_results(ids, [result_line("a", "ok")], [result_line("b", "batch_expired")]) == 0
    assert foreign_results(ids, [result_line("x", "ok")], []) == 1


def test_a_rerun_with_another_batchs_input_is_refused_in_one_line(server: FakeBatchAPI, tmp_path: Path) -> None:
    server.answers = [batch_body("batch_1", "expired", 1, 1, output_file_id="file-out", error_file_id="file-err")]
    server.files["file-out"] = result_line("a", "ok") + "\n"
    server.files["file-err"] = result_line("b", "batch_expired") + "\n"
    wrong = tmp_path / "other.jsonl"
    wrong.write_bytes(input_file(["x", "y"]))
    refused = llama_batches(server.url, "rerun", "batch_1", "--input", wrong, "-o", tmp_path / "out.jsonl")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        f"error: {wrong} is not the input of batch batch_1: it holds 2 requests, the batch 2, and their custom_ids"
        " do not match its results"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    bad = llama_batches(server.url, "rerun", "batch_1", "--input", broken, "-o", tmp_path / "out.jsonl")
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: {broken}: ") and "Traceback" not in bad.stderr
