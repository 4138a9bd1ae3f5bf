"""One batch's run: validation, sliding-window execution, finalization.

A job starts from whatever status its batch is stored in, so the same code runs a new batch and
resumes an interrupted one:

    validating   read the input file through the Files API and check every line (off the event loop)
    in_progress  skip requests whose results are stored; run the rest, at most `window` in flight,
                 a new one starting as soon as any finishes
    finalizing   write `<batch_id>_output.jsonl` / `_error.jsonl` from the stored results
    cancelling   stop dispatching, give in-flight requests a grace period, keep every result

Finished results go to the kvstore as they come (result_log.py); a request counts as done once
its result is stored. Expiry works like a cancel, but every request left without a result gets a
`batch_expired` error line. A server stop (`stopping`) ends dispatching the same way, then leaves
the batch in its status, to be resumed. A lost lease (`lease_lost`: another server has the batch
now) ends it at once, and the job writes nothing more; every batch update it makes carries its
lease, so a write it had under way is refused (LeaseLostError).
"""

import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, BinaryIO

from fastapi import UploadFile
from llama_stack.log import get_logger
from llama_stack_api import (
    BatchObject,
    Files,
    GetModelRequest,
    Models,
    OpenAIFilePurpose,
    RetrieveFileContentRequest,
    RetrieveFileRequest,
    UploadFileRequest,
)
from openai.types.batch import Errors
from openai.types.batch_error import BatchError
from openai.types.batch_request_counts import BatchRequestCounts
from pydantic import BaseModel

from . import formats
from .endpoints import RequestSender, response_tokens, result_for_exception
from .input_file import MAX_FILE_BYTES, InputIndex, ParsedInput, file_error, parse_input
from .lifecycle import BatchStatus, IllegalTransitionError, is_terminal, transition
from .ownership import acting_as, carries_request_credentials
from .resilience import AdaptiveLimit
from .result_log import ResultLog
from .results import ResultEntry, ResultSpool, Tally, decode_results
from .store import BatchStore, Lease

logger = get_logger(name=__name__, category="providers")


class Stop(Enum):
    """Why dispatching ended before every request ran."""

    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"  # another server runs the batch now
    CREDENTIALS_GONE = "credentials_gone"  # resumed after a restart; the creator's request credentials are not kept


# The error line for each request that never ran, by the reason it never will.
UNRUN_LINES = {Stop.EXPIRED: formats.expired_line, Stop.CREDENTIALS_GONE: formats.credentials_unavailable_line}


@dataclass
class JobSettings:
    """The parts of the provider config a job needs."""

    window: int
    grace_seconds: float
    shutdown_grace_seconds: float


@dataclass
class BatchJob:
    """Runs one batch to a terminal status."""

    lease: Lease
    store: BatchStore
    sender: RequestSender
    files: Files
    models: Models
    settings: JobSettings
    cancel_requested: asyncio.Event
    stopping: asyncio.Event
    lease_lost: asyncio.Event
    clock: Callable[[], float] = time.time
    _done: bytearray = field(default_factory=bytearray)
    _total: int = 0
    _log: ResultLog | None = None

    @property
    def batch_id(self) -> str:
        return self.lease.batch_id

    def _now(self) -> int:
        return int(self.clock())

    async def _update(self, change: Callable[[BatchObject], BatchObject]) -> BatchObject:
        return await self.store.update(self.batch_id, change, self.lease)

    async def _move(self, target: BatchStatus, **fields: Any) -> BatchObject:
        return await self._update(lambda b: transition(b, target, self._now(), **fields))

    # --- the run --------------------------------------------------------------------------------

    async def run(self) -> None:
        stored = await self.store.get(self.batch_id)
        if stored is None or is_terminal(stored.batch.status):
            # Finished, or never fully created, before a crash could take it off the work queue.
            await self.store.retire(self.batch_id)
            return
        # Files are read and written, and models reached, with the creator's rights.
        with acting_as(stored.owner):
            credentials_gone = stored.request_credentials and not carries_request_credentials()
            await self._run(stored.batch, credentials_gone)

    async def _run(self, batch: BatchObject, credentials_gone: bool) -> None:
        parsed = await self._read_input(batch)
        if parsed.errors and batch.status == "validating":
            await self._move("failed", errors=Errors(object="list", data=parsed.errors))
            await self.store.retire(self.batch_id)
            return
        if parsed.errors:
            # The file was valid when the batch started and has gone since: no request can run any
            # more, so the batch is finished with the results it has.
            logger.error("Input file unreadable on resume", batch_id=self.batch_id, errors=str(parsed.errors))
            await self._finalize(None, [], total=batch.request_counts.total if batch.request_counts else 0)
            return
        self._total = len(parsed.index)
        self._done = bytearray(self._total)
        self._log = await self._open_result_log()

        stop: Stop | None = None
        if batch.status == "validating":
            model = next(iter(parsed.first_line_of_model), None)
            try:
                batch = await self._move("in_progress", request_counts=self._log.counts(), model=model)
            except IllegalTransitionError:  # cancelled while validating
                batch = await self.store.get_batch(self.batch_id)
        if batch.status == "in_progress" and credentials_gone:
            # Running the rest under the server's own credentials would bill or expose the wrong account.
            stop = Stop.CREDENTIALS_GONE
        elif batch.status == "in_progress":
            stop = await self._execute(batch, parsed.index)
        elif batch.status == "cancelling":
            stop = Stop.CANCELLED
        if stop in (Stop.SHUTDOWN, Stop.LEASE_LOST):
            return
        unrun = await asyncio.to_thread(self._unrun_entries, parsed.index, stop) if stop in UNRUN_LINES else []
        del parsed  # the input is not needed any more: free it before the result files are built
        await self._finalize(stop, unrun, self._total)

    async def _open_result_log(self) -> ResultLog:
        """The batch's result log, with the requests whose results are stored (a resumed batch) marked
        done so that they do not run again."""
        stored: list[ResultEntry] = []
        epoch = self.lease.epoch
        async for _, chunk in self.store.results.through(self.batch_id, epoch - 1):
            stored.extend(decode_results(chunk))
        chunks_of_epoch = 0  # more than 0 when a job retries under the same lease
        async for chunk in self.store.results.of_epoch(self.batch_id, epoch):
            stored.extend(decode_results(chunk))
            chunks_of_epoch += 1
        first_results = []  # a request found twice ran on two servers: its first result counts
        for entry in stored:
            if not self._done[entry.position]:
                self._done[entry.position] = 1
                first_results.append(entry)
        tally = await asyncio.to_thread(Tally.of, first_results) if first_results else Tally()
        return ResultLog(self.store, self.lease, self._total, stored_chunks=chunks_of_epoch, tally=tally)

    async def _read_input(self, batch: BatchObject) -> ParsedInput:
        try:
            info = await self.files.openai_retrieve_file(RetrieveFileRequest(file_id=batch.input_file_id))
            if info.bytes > MAX_FILE_BYTES:
                return ParsedInput(errors=[file_error(f"The input file is larger than {MAX_FILE_BYTES >> 20} MB.")])
            response = await self.files.openai_retrieve_file_content(
                RetrieveFileContentRequest(file_id=batch.input_file_id)
            )
        except Exception:
            return ParsedInput(errors=[file_error(f"Cannot find the input file {batch.input_file_id!r}.")])
        # Checking 50,000 lines takes a while: a thread keeps the event loop answering meanwhile.
        parsed = await asyncio.to_thread(parse_input, bytes(response.body), batch.endpoint)
        if not parsed.errors:
            parsed.errors.extend(await self._unknown_models(parsed.first_line_of_model))
        return parsed

    async def _unknown_models(self, first_line_of_model: dict[str, int]) -> list[BatchError]:
        """A model_not_found error for each distinct unknown model, at the first line naming it."""
        errors = []
        for model, line in first_line_of_model.items():
            try:
                await self.models.get_model(GetModelRequest(model_id=model))
            except Exception:
                message = f"The model {model!r} does not exist or is not available."
                errors.append(BatchError(code="model_not_found", line=line, param="body.model", message=message))
        return errors

    # --- execution ------------------------------------------------------------------------------

    async def _execute(self, batch: BatchObject, index: InputIndex) -> Stop | None:
        """Run every request without a stored result; return why it stopped early, if it did."""
        window = AdaptiveLimit(self.settings.window)
        in_flight: set[asyncio.Task[None]] = set()

        async def run_one(position: int) -> None:
            request = index.request(position)
            try:
                response = await self.sender.send(batch.endpoint, request.body, window, self.stopping)
            except Exception as exc:
                if self.stopping.is_set():
                    return  # perhaps the server going down, not the request: it runs again after the restart
                self._record_failure(position, result_for_exception(request, exc))
            else:
                self._record_success(position, request.custom_id, response)
            finally:
                await window.release()

        async def dispatch() -> None:
            for position in range(self._total):
                if self._done[position]:
                    continue
                await window.acquire()
                task = asyncio.create_task(run_one(position))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                await asyncio.gather(*in_flight)

        log = self._log
        assert log is not None
        dispatcher = asyncio.create_task(dispatch())
        cancelled = asyncio.create_task(self.cancel_requested.wait())
        stopping = asyncio.create_task(self.stopping.wait())
        lost = asyncio.create_task(self.lease_lost.wait())
        expiry = asyncio.create_task(asyncio.sleep(max(0, (batch.expires_at or 0) - self.clock())))
        writer = asyncio.create_task(log.write_continuously())
        try:
            waiting = {dispatcher, cancelled, stopping, lost, expiry, writer}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()  # the writer only ends on an error (the store's, or LeaseLostError): raise it
            if dispatcher.done():
                dispatcher.result()  # re-raise what went wrong, if anything did
                return None
            if lost.done():
                return Stop.LEASE_LOST  # its results would be written for nothing: abandon the requests
            stop = Stop.SHUTDOWN if stopping.done() else Stop.CANCELLED if cancelled.done() else Stop.EXPIRED
            dispatcher.cancel()
            grace = self.settings.shutdown_grace_seconds if stop is Stop.SHUTDOWN else self.settings.grace_seconds
            await self._let_in_flight_finish(in_flight, grace)
            return stop
        finally:
            for task in (dispatcher, cancelled, stopping, lost, expiry, writer, *in_flight):
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            if not self.lease_lost.is_set():
                await log.flush()
                await log.report_progress()

    async def _let_in_flight_finish(self, in_flight: set[asyncio.Task[None]], grace_seconds: float) -> None:
        """Give requests in flight a bounded time to finish, then abandon them."""
        if in_flight:
            _, abandoned = await asyncio.wait(set(in_flight), timeout=grace_seconds)
            for task in abandoned:
                task.cancel()
            await asyncio.gather(*abandoned, return_exceptions=True)

    def _record_success(self, position: int, custom_id: str, response: BaseModel) -> None:
        line = formats.success_line(custom_id, response.model_dump_json(exclude_none=True))
        self._log.add_success(ResultEntry(position, True, line), *response_tokens(response))  # type: ignore[union-attr]
        self._done[position] = 1

    def _record_failure(self, position: int, line: str) -> None:
        self._log.add_failure(ResultEntry(position, False, line))  # type: ignore[union-attr]
        self._done[position] = 1

    # --- finalization ---------------------------------------------------------------------------

    async def _finalize(self, stop: Stop | None, unrun: list[ResultEntry], total: int) -> None:
        """Write the result files from the stored results and move the batch to its final status."""
        if stop in (None, Stop.CREDENTIALS_GONE):  # on the way to `completed`
            # A cancel may have come in as the last requests finished; then the batch stays cancelling.
            now = self._now()
            await self._update(lambda b: transition(b, "finalizing", now) if b.status == "in_progress" else b)
        stored = await self.store.get(self.batch_id)
        uploaded = dict(stored.uploaded_files) if stored else {}
        temporary = tempfile.TemporaryFile
        with temporary() as parking, temporary() as output, temporary() as error:
            spool = ResultSpool(total, parking)
            # Oldest first: a request run twice (on two servers) keeps the result the job counted.
            chunks_by_epoch: Counter[int] = Counter()
            async for epoch, chunk in self.store.results.through(self.batch_id, self.lease.epoch):
                spool.add(decode_results(chunk))
                chunks_by_epoch[epoch] += 1
            spool.add(unrun)
            # Copying 50,000 lines is work for a thread: the event loop keeps answering meanwhile.
            completed, failed = await asyncio.to_thread(spool.write_files, output, error)
            for kind, content in (("output", output), ("error", error)):
                if kind not in uploaded and content.tell() > 0:
                    content.seek(0)
                    uploaded[kind] = await self._upload(kind, content)
                    await self.store.update_record(
                        self.batch_id, lambda s: s.model_copy(update={"uploaded_files": dict(uploaded)}), self.lease
                    )
        fields = {
            "output_file_id": uploaded.get("output"),
            "error_file_id": uploaded.get("error"),
            "request_counts": BatchRequestCounts(total=total, completed=completed, failed=failed),
            "usage": (self._log.tally if self._log else Tally()).usage(),
        }

        def close(batch: BatchObject) -> BatchObject:
            if batch.status == "cancelling":
                return transition(batch, "cancelled", self._now(), **fields)
            return transition(batch, "expired" if stop is Stop.EXPIRED else "completed", self._now(), **fields)

        final = await self._update(close)
        await self.store.retire(self.batch_id)
        await self.store.results.delete(self.batch_id, chunks_by_epoch)
        logger.info("Batch finished", batch_id=self.batch_id, status=final.status, completed=completed)

    def _unrun_entries(self, index: InputIndex, stop: Stop) -> list[ResultEntry]:
        """An error line (`batch_expired`, `credentials_unavailable`) for every request that has no result."""
        line = UNRUN_LINES[stop]
        return [
            ResultEntry(position, False, line(index.request(position).custom_id))
            for position in range(len(index))
            if not self._done[position]
        ]

    async def _upload(self, kind: str, content: BinaryIO) -> str:
        upload = UploadFile(file=content, filename=f"{self.batch_id}_{kind}.jsonl")
        uploaded = await self.files.openai_upload_file(
            request=UploadFileRequest(purpose=OpenAIFilePurpose.BATCH), file=upload
        )
        return uploaded.id
