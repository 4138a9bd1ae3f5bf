"""A batch as the provider keeps it (`StoredBatch`), and the shape of a batch id."""

import re
from typing import Any

from pydantic import BaseModel

from ..stack import BatchObject
from .ownership import Owner

# Our ids are `batch_<32 hex>`; the bound leaves room for other shapes without letting a cursor or a
# path parameter of any size reach the store.
MAX_BATCH_ID_CHARS = 64


_BATCH_ID = re.compile(r"[A-Za-z0-9_-]+")


def is_batch_id(batch_id: Any) -> bool:
    """Whether `batch_id` can name a batch: 1 to 64 characters of [A-Za-z0-9_-]. Anything else is unknown."""
    return isinstance(batch_id, str) and len(batch_id) <= MAX_BATCH_ID_CHARS and bool(_BATCH_ID.fullmatch(batch_id))


class StoredBatch(BaseModel):
    """A batch as stored: the object clients see, and what the provider keeps beside it."""

    batch: BatchObject
    owner: Owner | None = None  # its storage scope is scope_of(owner)
    # Whether the creating request carried provider credentials; they are never stored themselves.
    request_credentials: bool = False
    idempotency_key: str | None = None
    # Result files already uploaded by an interrupted finalization ("output"/"error" -> file id).
    uploaded_files: dict[str, str] = {}
    # When an upload of a result file began ("output"/"error" -> epoch seconds), until it is recorded above.
    uploading: dict[str, int] = {}
    # How many times in a row processing this batch raised unexpectedly (attempts.py ends it at a
    # limit), and how many of its requests had results at the last of those failures: a batch that
    # made progress since starts counting again.
    processing_failures: int = 0
    results_at_last_failure: int = 0
    # Requests in its input file, counted at create when a per-user request limit is set (user_limits.py).
    request_lines: int | None = None
    # `output_expires_after.seconds` of its create: its result files expire that long after they are written.
    output_expires_after_seconds: int | None = None
