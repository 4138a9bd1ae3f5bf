import pytest

from llama_stack_provider_batches.domain.lifecycle import (
    ALLOWED_MOVES,
    TERMINAL_STATUSES,
    IllegalTransitionError,
    can_move,
    is_terminal,
    transition,
)
from tests.unit.helpers import make_batch


def test_terminal_statuses_are_exactly_the_openai_end_states() -> None:
    assert {"completed", "failed", "expired", "cancelled"} == TERMINAL_STATUSES


@pytest.mark.parametrize("current", sorted(ALLOWED_MOVES))
@pytest.mark.parametrize("target", sorted(ALLOWED_MOVES))
def test_transition_follows_the_table(current: str, target: str) -> None:
    batch = make_batch(status=current)
    if target in ALLOWED_MOVES[current]:
        moved = transition(batch, target, now=200)
        assert moved.status == target
    else:
        with pytest.raises(IllegalTransitionError):
            transition(batch, target, now=200)


@pytest.mark.parametrize(
    ("current", "target", "stamp"),
    [
        ("validating", "in_progress", "in_progress_at"),
        ("validating", "failed", "failed_at"),
        ("in_progress", "finalizing", "finalizing_at"),
        ("finalizing", "completed", "completed_at"),
        ("in_progress", "cancelling", "cancelling_at"),
        ("cancelling", "cancelled", "cancelled_at"),
        ("in_progress", "expired", "expired_at"),
    ],
)
def test_entering_a_status_stamps_its_timestamp(current: str, target: str, stamp: str) -> None:
    moved = transition(make_batch(status=current), target, now=321)
    assert getattr(moved, stamp) == 321


def test_transition_sets_extra_fields_and_leaves_the_original_alone() -> None:
    original = make_batch(status="finalizing")
    moved = transition(original, "completed", now=5, output_file_id="file-out")
    assert moved.output_file_id == "file-out"
    assert original.status == "finalizing"
    assert original.output_file_id is None


def test_a_cancel_cannot_be_undone() -> None:
    assert not can_move("cancelling", "in_progress")
    assert not can_move("cancelling", "completed")
    assert is_terminal("cancelled")
    assert not is_terminal("cancelling")


def test_illegal_transition_is_a_conflict_naming_both_statuses() -> None:
    with pytest.raises(IllegalTransitionError, match="'completed' to 'in_progress'") as info:
        transition(make_batch(status="completed"), "in_progress", now=1)
    assert info.value.status_code == 409
