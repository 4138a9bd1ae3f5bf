"""Idempotent creation: what makes two create calls "the same request". Pure functions, no I/O.

A client that retries a create with the same idempotency key gets the batch of its first call,
whatever that batch's status now. A key reused with any other parameter is a conflict (HTTP 409):
silently returning a batch for different input would hide a client bug.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from ..domain.errors import shown
from ..stack import BatchObject, ConflictError


@dataclass(frozen=True)
class CreateParams:
    """The parameters of a create call that define the batch."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Mapping[str, str] | None


def same_request(batch: BatchObject, params: CreateParams) -> bool:
    """Whether `params` ask for exactly the batch that was stored.

    Metadata compares as a mapping, so key order does not matter, but `None` and `{}` differ:
    they are different requests, and the stored batch returns the one it was given.
    """
    stored_metadata = None if batch.metadata is None else dict(batch.metadata)
    asked_metadata = None if params.metadata is None else dict(params.metadata)
    return (
        batch.input_file_id == params.input_file_id
        and batch.endpoint == params.endpoint
        and batch.completion_window == params.completion_window
        and stored_metadata == asked_metadata
    )


class IdempotencyConflictError(ConflictError):
    """An idempotency key reused with other parameters (HTTP 409)."""

    param = "idempotency_key"
    code = "idempotency_key_reused"


def conflict(key: str, batch: BatchObject, params: CreateParams) -> IdempotencyConflictError:
    """The error for a key reused with other parameters; it names the parameters that differ."""
    differing = [
        name
        for name in ("input_file_id", "endpoint", "completion_window", "metadata")
        if getattr(batch, name) != getattr(params, name)
    ]
    return IdempotencyConflictError(
        f"Idempotency token '{shown(key)}' was previously used with different parameters "
        f"({', '.join(differing)}). Use a new idempotency key, or repeat the original parameters."
    )
