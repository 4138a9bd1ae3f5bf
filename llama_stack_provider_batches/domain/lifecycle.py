"""The life of a batch: its statuses and the only moves allowed between them.

Every status change of a batch goes through `transition`, so this table is the whole truth:

    validating  -> in_progress | failed | cancelling | expired
    in_progress -> finalizing  | cancelling | expired | failed
    finalizing  -> completed   | cancelling | expired | failed
    cancelling  -> cancelled
    completed, failed, expired, cancelled: terminal

`failed` after `validating` is not OpenAI's (there, only validation fails a batch): it ends a batch
that cannot go on, because its input file is gone or its processing failed again and again (a
poison batch, runner.py); such a batch keeps the result files of what it finished.

Entering a status stamps its timestamp field (`in_progress_at`, `failed_at`, ...), as OpenAI does.
"""

from typing import Any, Literal

from ..stack import BatchObject, ConflictError

BatchStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
]

ALLOWED_MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    "validating": frozenset({"in_progress", "failed", "cancelling", "expired"}),
    "in_progress": frozenset({"finalizing", "cancelling", "expired", "failed"}),
    "finalizing": frozenset({"completed", "cancelling", "expired", "failed"}),
    "cancelling": frozenset({"cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "expired": frozenset(),
    "cancelled": frozenset(),
}

TERMINAL_STATUSES: frozenset[BatchStatus] = frozenset(s for s, moves in ALLOWED_MOVES.items() if not moves)

# The batch field stamped with the time a status is entered.
TIMESTAMP_FIELD: dict[BatchStatus, str] = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


class IllegalTransitionError(ConflictError):
    """A status change that the table above does not allow (HTTP 409 if it reaches a client).

    `param` and `code` are the fields of OpenAI's error object the API answers with (http_errors.py).
    """

    param: str | None = None
    code: str | None = None

    def __init__(self, batch_id: str, current: str, target: str, message: str | None = None) -> None:
        super().__init__(message or f"Batch '{batch_id}' cannot move from status '{current}' to '{target}'.")
        self.current = current
        self.target = target


class BatchNotCancellableError(IllegalTransitionError):
    """A cancel of a batch that has ended (completed, failed or expired): HTTP 409 in OpenAI's words.

    OpenAI documents no code for it; this one names the refusal, so that a client can tell it from
    the other 409 (a reused idempotency key) without matching the message. No `param`: the request
    holds nothing to correct, the batch is done.
    """

    code = "batch_not_cancellable"

    def __init__(self, batch_id: str, current: str) -> None:
        super().__init__(batch_id, current, "cancelling", f"Cannot cancel a batch with status '{current}'.")


def can_move(current: str, target: BatchStatus) -> bool:
    """Whether a batch in `current` may move to `target`."""
    return target in ALLOWED_MOVES.get(current, frozenset())  # type: ignore[call-overload]


def is_terminal(status: str) -> bool:
    """Whether no further move is possible from `status`."""
    return status in TERMINAL_STATUSES


def transition(batch: BatchObject, target: BatchStatus, now: int, **fields: Any) -> BatchObject:
    """Return a copy of `batch` in status `target`, stamped at `now`, with `fields` set alongside.

    Raises IllegalTransitionError if the move is not in ALLOWED_MOVES.
    """
    if not can_move(batch.status, target):
        raise IllegalTransitionError(batch.id, batch.status, target)
    return batch.model_copy(update={"status": target, TIMESTAMP_FIELD[target]: now, **fields})


# Batches in these statuses still have work to do: they are claimed and run until terminal.
UNFINISHED_STATUSES: tuple[BatchStatus, ...] = ("validating", "in_progress", "finalizing", "cancelling")


# Batches in these statuses may have shards at work (shards.py): their progress is summed from them.
RUNNING_STATUSES: tuple[BatchStatus, ...] = ("in_progress", "cancelling", "finalizing")
