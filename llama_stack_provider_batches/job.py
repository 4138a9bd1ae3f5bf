"""One batch's run: validation, then sliding-window execution; the end goes to finalization.py.

A job starts from whatever status its batch is stored in, so the same code runs a new batch and
resumes an interrupted one:

    validating   read the input file through the Files API and check every line (off the event loop);
                 store the requests' custom_ids (store.RequestIds), then move to in_progress
    in_progress  skip requests whose results are stored; run the rest, at most `window` in flight,
                 a new one starting as soon as any finishes
    finalizing   write the result files from the stored results (finalization.py)
    cancelling   the same, at once: the input file is not read again

Expiry is checked before anything else, so nothing is sent to the model after `expires_at`: a batch
still validating expires with no request, a running one with a `batch_expired` line for every
request left. A batch whose input file is gone when it resumes ends `failed`, with an
`input_file_unavailable` line for every request left. Finished results go to the kvstore as they
come (result_log.py); a request counts as done once its result is stored.

A server stop (`stopping`) ends dispatching like a cancel, then leaves the batch in its status, to
be resumed. A lost lease (`lease_lost`: another server has the batch now) ends it at once, and the
job writes nothing more; every batch update it makes carries its lease, so a write it had under way
is refused (LeaseLostError).
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llama_stack.log import get_logger
from llama_stack_api import BatchObject, Files, Models
from openai.types.batch import Errors
from openai.types.batch_error import BatchError
from openai.types.batch_request_counts import BatchRequestCounts
from pydantic import BaseModel

from . import formats
from .endpoints import DeadlineReached, RequestSender, result_for_exception, result_for_response
from .finalization import Finalizer, UnrunLine, final_status
from .input_file import MAX_LISTED_ERRORS, InputIndex, file_error
from .input_reader import InputFileGone, read_checked_input, read_requests
from .lifecycle import BatchStatus, IllegalTransitionError, is_terminal, transition
from .ownership import acting_as, carries_request_credentials
from .resilience import AdaptiveLimit
from .result_log import ResultLog
from .results import ResultEntry, Tally, decode_results
from .store import BatchStore, Lease, StoredBatch

logger = get_logger(name=__name__, category="providers")


class Stop(Enum):
    """Why dispatching ended before every request ran."""

    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"  # another server runs the batch now


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
    _validated: InputIndex | None = None  # the requests, when this run validated the file

    @property
    def batch_id(self) -> str:
        return self.lease.batch_id

    def _now(self) -> int:
        return int(self.clock())

    def _past_deadline(self, batch: BatchObject) -> bool:
        return batch.expires_at is not None and self.clock() >= batch.expires_at

    def _finalizer(self) -> Finalizer:
        return Finalizer(self.lease, self.store, self.files, self.clock)

    async def _move(self, target: BatchStatus, **fields: Any) -> BatchObject:
        change = lambda b: transition(b, target, self._now(), **fields)  # noqa: E731
        return await self.store.update(self.batch_id, change, self.lease)

    # --- the run --------------------------------------------------------------------------------

    async def run(self) -> None:
        stored = await self.store.get(self.batch_id)
        if stored is None or is_terminal(stored.batch.status):
            return  # finished by another server before this claim
        # Files are read and written, and models reached, with the creator's rights.
        with acting_as(stored.owner):
            await self._run(stored)

    async def give_up(self, cause: str) -> None:
        """End the batch `failed` (or `cancelled`, if that was asked) after processing it failed for good.

        The results stored so far go into its result files; if even that fails, they stay in the
        kvstore under `results/<batch_id>/`, and the batch is marked failed without files.
        """
        stored = await self.store.get(self.batch_id)
        if stored is None or is_terminal(stored.batch.status):
            return
        errors = [BatchError(code="batch_processing_failed", line=None, param=None, message=cause)]
        total = stored.batch.request_counts.total if stored.batch.request_counts else 0
        try:
            with acting_as(stored.owner):
                await self._finalizer().close("failed", total, errors=errors)
            return
        except Exception:
            logger.exception("Cannot write the result files of a failed batch; its results stay stored")
        kept = "Its results so far stay in the provider's kvstore; no result file could be written."
        errors = [errors[0].model_copy(update={"message": f"{cause} {kept}"})]
        closed = "cancelled" if stored.batch.status == "cancelling" else "failed"
        await self._move(closed, errors=Errors(object="list", data=errors))

    async def _run(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if batch.status == "validating":
            validated = await self._validate(batch)
            if validated is None:  # refused, or expired before it could start
                return
            batch = validated
        total = batch.request_counts.total if batch.request_counts else 0
        if batch.status in ("cancelling", "finalizing"):
            await self._finalizer().close("completed", total)
        elif self._past_deadline(batch):
            await self._finalizer().close("expired", total, formats.expired_line)
        elif stored.request_credentials and not carries_request_credentials():
            # Running the rest under the server's own credentials would bill or expose the wrong account.
            await self._finalizer().close("completed", total, formats.credentials_unavailable_line)
        else:
            await self._run_requests(batch, total)

    async def _run_requests(self, batch: BatchObject, total: int) -> None:
        try:
            # Just validated in this run: the checked file is at hand, reading and parsing it again is waste.
            index = self._validated or await read_requests(self.files, batch)
            self._validated = None
        except InputFileGone:
            logger.error("Input file gone; the batch ends failed", batch_id=self.batch_id)
            message = f"The input file {batch.input_file_id!r} cannot be read any more; the batch cannot go on."
            errors = [file_error(message, code="input_file_unavailable")]
            await self._finalizer().close("failed", total, formats.input_unavailable_line, errors=errors)
            return
        self._total = len(index)
        self._done = bytearray(self._total)
        self._log = await self._open_result_log()
        stop = await self._execute(batch, index)
        if stop in (Stop.SHUTDOWN, Stop.LEASE_LOST):
            return
        del index  # the input is not needed any more: free it before the result files are built
        unrun: UnrunLine | None = formats.expired_line if stop is Stop.EXPIRED else None
        await self._finalizer().close(
            "expired" if stop is Stop.EXPIRED else "completed", self._total, unrun, tally=self._log.tally
        )

    # --- validation -----------------------------------------------------------------------------

    async def _validate(self, batch: BatchObject) -> BatchObject | None:
        """Check the input file; store the custom_ids and move to in_progress. None if the batch ended here."""
        parsed = None if self._past_deadline(batch) else await read_checked_input(self.files, self.models, batch)
        if parsed is None or self._past_deadline(batch):
            # Before or while it was checked: no request ran, and none will.
            await self._finalizer().close("expired", 0)
            return None
        if parsed.errors:
            errors = Errors(object="list", data=parsed.errors[: MAX_LISTED_ERRORS + 1])
            now = self._now()
            refuse = lambda b: transition(b, final_status(b, "failed"), now, errors=errors)  # noqa: E731
            await self.store.update(self.batch_id, refuse, self.lease)  # cancelled meanwhile: cancelled
            return None
        await self.store.request_ids.save(self.batch_id, parsed.custom_ids)
        self._validated = parsed.index
        counts = BatchRequestCounts(total=len(parsed.custom_ids), completed=0, failed=0)
        model = next(iter(parsed.first_line_of_model), None)
        try:
            return await self._move("in_progress", request_counts=counts, model=model)
        except IllegalTransitionError:  # cancelled while it was checked: no request will run
            await self.store.request_ids.delete(self.batch_id, len(parsed.custom_ids))
            return await self.store.get_batch(self.batch_id)

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
            if entry.position < self._total and not self._done[entry.position]:
                self._done[entry.position] = 1
                first_results.append(entry)
        tally = await asyncio.to_thread(Tally.of, first_results) if first_results else Tally()
        return ResultLog(self.store, self.lease, self._total, stored_chunks=chunks_of_epoch, tally=tally)

    # --- execution ------------------------------------------------------------------------------

    async def _execute(self, batch: BatchObject, index: InputIndex) -> Stop | None:
        """Run every request without a stored result; return why it stopped early, if it did."""
        window = AdaptiveLimit(self.settings.window)
        in_flight: set[asyncio.Task[None]] = set()

        def expired() -> bool:
            return self._past_deadline(batch)

        async def run_one(position: int) -> None:
            request = index.request(position)
            try:
                response = await self.sender.send(batch.endpoint, request.body, window, self.stopping, expired)
            except DeadlineReached:
                return  # it was never sent: it gets its `batch_expired` line at the end
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
                if self._stop_asked() or expired():  # their waiters may not have run yet: start nothing more
                    await window.release()
                    break
                task = asyncio.create_task(run_one(position))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                # Not gather: cancelling this task must leave requests in flight their grace period.
                finished, _ = await asyncio.wait(set(in_flight))
                for task in finished:
                    task.result()  # re-raise what went wrong in one, if anything did

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
            if self.lease_lost.is_set():
                return Stop.LEASE_LOST  # its results would be written for nothing: abandon the requests
            if dispatcher.done():
                dispatcher.result()  # re-raise what went wrong, if anything did
            if dispatcher.done() and not self._stop_asked() and all(self._done):
                return None
            # The events, not their waiter tasks: a waiter may not have run yet when the dispatcher stops.
            stop = Stop.SHUTDOWN if self.stopping.is_set() else Stop.CANCELLED
            if not self.stopping.is_set() and not self.cancel_requested.is_set():
                stop = Stop.EXPIRED  # the only other reason for the dispatcher to stop with requests left
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

    def _stop_asked(self) -> bool:
        return self.cancel_requested.is_set() or self.stopping.is_set() or self.lease_lost.is_set()

    async def _let_in_flight_finish(self, in_flight: set[asyncio.Task[None]], grace_seconds: float) -> None:
        """Give requests in flight a bounded time to finish, then abandon them."""
        if in_flight:
            _, abandoned = await asyncio.wait(set(in_flight), timeout=grace_seconds)
            for task in abandoned:
                task.cancel()
            await asyncio.gather(*abandoned, return_exceptions=True)

    def _record_success(self, position: int, custom_id: str, response: BaseModel) -> None:
        ok, line, input_tokens, output_tokens = result_for_response(custom_id, response)
        if ok:
            self._log.add_success(ResultEntry(position, True, line), input_tokens, output_tokens)  # type: ignore[union-attr]
        else:  # an answer that cannot be written as a result line is this request's error, not the batch's
            self._log.add_failure(ResultEntry(position, False, line))  # type: ignore[union-attr]
        self._done[position] = 1

    def _record_failure(self, position: int, line: str) -> None:
        self._log.add_failure(ResultEntry(position, False, line))  # type: ignore[union-attr]
        self._done[position] = 1
