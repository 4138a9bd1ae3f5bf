"""The end of a batch: its last status, and the lines of the requests that never ran."""

import json

import pytest

from llama_stack_provider_batches.finalization import final_status, unrun_entries
from llama_stack_provider_batches.formats import expired_line
from tests.unit.helpers import make_batch


@pytest.mark.parametrize("outcome", ["completed", "expired", "failed"])
def test_a_cancel_asked_for_wins_over_any_other_end(outcome: str) -> None:
    assert final_status(make_batch(status="cancelling"), outcome) == "cancelled"  # type: ignore[arg-type]
    assert final_status(make_batch(status="in_progress"), outcome) == outcome  # type: ignore[arg-type]


def test_unrun_requests_get_their_custom_id_where_it_is_known() -> None:
    entries = unrun_entries([0, 2, 5], ["a", "b", "c"], expired_line)
    assert [entry.position for entry in entries] == [0, 2, 5]
    assert not any(entry.ok for entry in entries)
    lines = [json.loads(entry.line_json) for entry in entries]
    assert [line["custom_id"] for line in lines] == ["a", "c", None]  # 5: stored by no earlier release
    assert {line["error"]["code"] for line in lines} == {"batch_expired"}
