"""Ending a batch that started: its result files, assembled from the stored results, and its last status.

Every batch that got past validation ends through `Finalizer.close`, whatever stopped it:

    completed   every request ran (or, resumed without its creator's credentials, got an error line)
    expired     the completion window closed; requests that never ran get `batch_expired` lines
    failed      the batch cannot go on: its input file is gone (`input_file_unavailable` lines for the
                requests that never ran), or processing it failed `max_job_attempts` times (runner.py)
    cancelled   whatever was asked, a batch that is `cancelling` ends `cancelled`; requests that never
                ran get no line, as OpenAI does

The files hold one line per stored result, in input order; a request stored twice (it ran on two
servers) keeps its first result. Closing is idempotent: a file is recorded in the batch once uploaded,
and the start of each upload is recorded before it, so that a close interrupted between the two
finds the file it uploaded (by name and size) instead of uploading a second one, and records its
expiry (`output_expires_after`) again, in case the interruption came before that.
"""

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal, Protocol

from fastapi import UploadFile
from openai.types.batch import Errors
from openai.types.batch_error import BatchError
from openai.types.batch_request_counts import BatchRequestCounts

from ..domain.lifecycle import transition
from ..domain.records import StoredBatch
from ..domain.results import ResultEntry, ResultSpool, Tally, decode_results
from ..stack import (
    BatchObject,
    ExpiresAfter,
    Files,
    ListFilesRequest,
    OpenAIFilePurpose,
    OpenAIFileUploadPurpose,
    Order,
    UploadFileRequest,
    get_logger,
    set_file_expiry,
)
from ..storage.store import BatchStore, Lease

logger = get_logger(name=__name__, category="providers")

FILES_PAGE = 100
MAX_FILES_SCANNED = 10_000

Outcome = Literal["completed", "expired", "failed"]
# The error line of a request that never ran, from its custom_id (None if it is not known).
UnrunLine = Callable[[str | None], str]


class UploadedFile(Protocol):
    """What an upload, or the Files API's list, says of a result file."""

    id: str
    created_at: int


@dataclass
class Finalizer:
    """Writes one batch's result files and moves it to its terminal status, under its lease."""

    lease: Lease
    store: BatchStore
    files: Files
    clock: Callable[[], float] = time.time

    @property
    def batch_id(self) -> str:
        return self.lease.batch_id

    async def close(
        self,
        outcome: Outcome,
        total: int,
        unrun_line: UnrunLine | None = None,
        errors: list[BatchError] | None = None,
        tally: Tally | None = None,
    ) -> BatchObject:
        """End the batch as `outcome` (or `cancelled` if it is cancelling).

        `unrun_line` gives every request without a stored result its error line; `tally` is the
        usage of the stored results when the caller kept it, else it is computed from them.
        """
        if outcome == "completed":
            # A cancel may have come in as the last requests finished; then the batch stays cancelling.
            now = int(self.clock())
            await self._update(lambda b: transition(b, "finalizing", now) if b.status == "in_progress" else b)
        # Fence the shards off before reading their results: a run whose lease ran out unnoticed (a late
        # renewal on a loaded machine) still holds its token, and could store a result after the read,
        # or after the chunks are dropped below (left behind for good). Without the token it cannot.
        await self.store.shards.revoke(self.batch_id)
        stored = await self.store.get(self.batch_id)
        uploaded = dict(stored.uploaded_files) if stored else {}
        uploading = dict(stored.uploading) if stored else {}
        with tempfile.TemporaryFile() as parking, tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as error:
            spool = ResultSpool(total, parking)
            kept_tally = tally or Tally()
            # Oldest first: a request run twice (on two servers) keeps the result counted first.
            async for chunk in self.store.results.read(self.batch_id):
                kept = spool.add(decode_results(chunk))
                if tally is None and kept:
                    kept_tally.merge(await asyncio.to_thread(Tally.of, kept))
            missing = spool.missing() if unrun_line is not None else []
            if unrun_line is not None and missing:
                custom_ids = await self.store.request_ids.load(self.batch_id)
                await asyncio.to_thread(spool.add, unrun_entries(missing, custom_ids, unrun_line))
            # Copying 50,000 lines is work for a thread: the event loop keeps answering meanwhile.
            completed, failed = await asyncio.to_thread(spool.write_files, output, error)
            for kind, content in (("output", output), ("error", error)):
                if kind not in uploaded and content.tell() > 0:
                    started = uploading.get(kind)
                    found = await self._find_upload(kind, started, content.tell()) if started is not None else None
                    if found is None:
                        uploading[kind] = int(self.clock())
                        await self._record(uploading=dict(uploading))
                        content.seek(0)
                        found = await self._upload(kind, content, stored)
                    else:  # its expiry may not have been recorded before the interruption
                        await self._expire(found, stored)
                    uploaded[kind] = found.id
                    await self._record(uploaded_files=dict(uploaded))
        fields: dict[str, object] = {
            "output_file_id": uploaded.get("output"),
            "error_file_id": uploaded.get("error"),
            "request_counts": BatchRequestCounts(total=total, completed=completed, failed=failed),
            "usage": kept_tally.usage(),
        }
        if errors:
            fields["errors"] = Errors(object="list", data=errors)
        final = await self._update(lambda b: transition(b, final_status(b, outcome), int(self.clock()), **fields))
        await self.store.results.delete(self.batch_id)
        await self.store.request_ids.delete(self.batch_id)
        await self.store.shards.delete(self.batch_id)
        logger.info("Batch finished", batch_id=self.batch_id, status=final.status, completed=completed, failed=failed)
        return final

    async def _update(self, change: Callable[[BatchObject], BatchObject]) -> BatchObject:
        return await self.store.update(self.batch_id, change, self.lease)

    async def _record(self, **fields: object) -> None:
        await self.store.update_record(self.batch_id, lambda s: s.model_copy(update=fields), self.lease)

    async def _find_upload(self, kind: str, since: int, size: int) -> UploadedFile | None:
        """The file an interrupted close uploaded (same name and size, created since it began), if any.

        Files newer than `since` are few (those created since a crash, at most MAX_FILES_SCANNED are
        looked at): finding it keeps a batch at one output and one error file whatever dies when.
        """
        name, after, scanned = f"{self.batch_id}_{kind}.jsonl", None, 0
        while scanned < MAX_FILES_SCANNED:
            page = await self.files.openai_list_files(
                ListFilesRequest(purpose=OpenAIFilePurpose.BATCH, order=Order.desc, limit=FILES_PAGE, after=after)
            )
            for info in page.data:
                if info.created_at < since - 1:  # older than the close that was interrupted
                    return None
                if info.filename == name and info.bytes == size:
                    return info
            scanned += len(page.data)
            if not page.has_more or not page.data:
                return None
            after = page.data[-1].id
        return None

    async def _upload(self, kind: str, content: BinaryIO, stored: StoredBatch | None) -> UploadedFile:
        upload = UploadFile(file=content, filename=f"{self.batch_id}_{kind}.jsonl")
        seconds = stored.output_expires_after_seconds if stored is not None else None
        expires_after = _expires_after(seconds)
        uploaded = await self.files.openai_upload_file(
            request=UploadFileRequest(purpose=OpenAIFileUploadPurpose.BATCH, expires_after=expires_after), file=upload
        )
        await self._expire(uploaded, stored)
        return uploaded

    async def _expire(self, uploaded: UploadedFile, stored: StoredBatch | None) -> None:
        """The batch's `output_expires_after`: the file's `expires_at` says so (set here where the Files
        provider ignored it), and the sweep deletes it then (housekeeping.py). Doing it again is harmless."""
        if stored is None or stored.output_expires_after_seconds is None:
            return
        expires_at = uploaded.created_at + stored.output_expires_after_seconds
        await set_file_expiry(self.files, uploaded.id, expires_at)
        await self.store.retention.expire_file_at(uploaded.id, self.batch_id, stored.owner, expires_at)


def _expires_after(seconds: int | None) -> ExpiresAfter | None:
    """The Files API's `expires_after`, where its bounds (OpenAI's) take `seconds`; shorter ones (an
    operator lowered `min_output_expires_after_seconds`) are applied by the provider alone."""
    if seconds is None:
        return None
    try:
        return ExpiresAfter(anchor="created_at", seconds=seconds)
    except ValueError:  # pydantic's ValidationError
        return None


def final_status(batch: BatchObject, outcome: Outcome) -> Literal["completed", "expired", "failed", "cancelled"]:
    """A cancel asked for is honoured whatever else ended the batch."""
    return "cancelled" if batch.status == "cancelling" else outcome


def unrun_entries(positions: list[int], custom_ids: list[str], line: UnrunLine) -> list[ResultEntry]:
    """An error entry for each request that never ran, by its custom_id where it is known."""
    return [
        ResultEntry(position, False, line(custom_ids[position] if position < len(custom_ids) else None))
        for position in positions
    ]
