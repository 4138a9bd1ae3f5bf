"""One batch's job, under the batch's lease: validation, its shards, and the end (finalization.py).

A job starts from whatever status its batch is stored in, so the same code runs a new batch and
resumes an interrupted one:

    validating   read the input file through the Files API and check every line (off the event loop);
                 store the requests' custom_ids (store.RequestIds), split the batch into shards
                 (shards.py), then move to in_progress
    in_progress  run the batch's free shards one after another (shard_run.py), while other processes
                 with a free slot may run others; then wait for the shards they hold, and finalize
    finalizing   write the result files from the stored results (finalization.py)
    cancelling   the same, once no process runs a shard of it any more: the input file is not read again

Expiry is checked before anything else, so nothing is sent to the model after `expires_at`: a batch
still validating expires with no request, a running one with a `batch_expired` line for every
request left. A batch whose input file is gone when it resumes ends `failed`, with an
`input_file_unavailable` line for every request left.

A server stop (`stopping`) ends dispatching like a cancel, then leaves the batch in its status, to
be resumed. A lost lease (`lease_lost`: another server has the batch now) ends it at once, and the
job writes nothing more; every batch update it makes carries its lease, so a write it had under way
is refused (LeaseLostError). The files are written once no shard is held: a cancel or expiry
reaches every shard through its heartbeat, and the wait is bounded by the grace period and a lease.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openai.types.batch import Errors
from openai.types.batch_error import BatchError
from openai.types.batch_request_counts import BatchRequestCounts

from .. import telemetry
from ..domain import formats
from ..domain.lifecycle import BatchStatus, IllegalTransitionError, is_terminal, transition
from ..domain.ownership import UNOWNED_SCOPE, acting_as, carries_request_credentials, scope_of
from ..domain.records import StoredBatch
from ..requests.endpoints import RequestSender
from ..requests.input_file import MAX_LISTED_ERRORS, InputIndex, ParsedInput, file_error
from ..requests.input_reader import InputFileGone, read_checked_input, read_requests
from ..requests.stack_apis import StackAPIs
from ..requests.token_estimates import body_estimator
from ..stack import BatchObject, Files, get_logger
from ..storage.shards import ShardLease, ShardTokens, split
from ..storage.store import BatchStore, Lease
from ..storage.token_quota import OverTokenLimit
from .finalization import Finalizer, Outcome, UnrunLine, final_status
from .result_log import Unstored
from .scheduler import Scheduler
from .shard_run import JobSettings, ShardRun, Stop

logger = get_logger(name=__name__, category="providers")

SHARDS_POLL_SECONDS = 0.2  # how often a job waiting for shards other processes run looks at them
OVERLAPPING_RUNS = 2  # shard runs of one batch at once in its job: one sending, one finishing


@dataclass
class BatchJob:
    """Runs one batch to a terminal status."""

    lease: Lease
    store: BatchStore
    sender: RequestSender
    files: Files
    apis: StackAPIs  # for validation: models and shields
    settings: JobSettings
    cancel_requested: asyncio.Event
    stopping: asyncio.Event
    lease_lost: asyncio.Event
    scheduler: Scheduler
    holder: str = "this-server"
    clock: Callable[[], float] = time.time
    _validated: InputIndex | None = None  # the requests, when this run validated the file
    _shareable: bool = True
    _owner_scope: str = UNOWNED_SCOPE
    _unstored: Unstored = field(default_factory=Unstored)  # the results its overlapping shard runs hold

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
        if stored.batch.status == "validating" and stored.processing_failures == 0:  # its first claim (or a resume)
            telemetry.job_started(stored.batch, self.clock())
        self._shareable = not stored.request_credentials
        self._owner_scope = scope_of(stored.owner)
        # Files are read and written, and models reached, with the creator's rights.
        batch = stored.batch
        with acting_as(stored.owner), telemetry.span("batches.job", batch_id=batch.id, endpoint=batch.endpoint):
            await self._run(stored)

    async def give_up(self, cause: str, outage: bool = False) -> None:
        """End the batch `failed` (or `cancelled`, if that was asked) after processing it failed for good.

        The results stored so far go into its result files; if even that fails, they stay in the
        store under `results/<batch_id>/` until its record's retention removes them (retention.py),
        and the batch is marked failed without files. A batch whose every request has a stored
        result is not failed: it is closed `completed`, and if that fails too the error reaches the
        caller (attempts.py sets the batch aside, to be resumed); unless a dependency's `outage`
        outlasted the batch's grace, when its files cannot be written.
        """
        stored = await self.store.get(self.batch_id)
        if stored is None or is_terminal(stored.batch.status):
            return
        running = stored.batch.status in ("in_progress", "finalizing")
        if running and not outage and await self._every_request_has_a_result():
            total = stored.batch.request_counts.total if stored.batch.request_counts else 0
            with acting_as(stored.owner):
                await self._finalizer().close("completed", total)
            return
        errors = [BatchError(code="batch_processing_failed", line=None, param=None, message=cause)]
        total = stored.batch.request_counts.total if stored.batch.request_counts else 0
        try:
            batch = stored.batch
            if batch.status == "in_progress":  # its shards stop everywhere, and none is claimed again
                batch = await self._move("finalizing")
            with acting_as(stored.owner):
                await self._close_when_quiet(batch, "failed", total, errors=errors)
            return
        except Exception:
            logger.exception("Cannot write the result files of a failed batch; its results stay stored")
        kept = (
            "Its results so far stay in the provider's SQL store until the batch's record is removed;"
            " no result file could be written."
        )
        errors = [errors[0].model_copy(update={"message": f"{cause} {kept}"})]
        closed = "cancelled" if stored.batch.status == "cancelling" else "failed"
        # The counts of the stored results, not those of the last progress written to the record.
        tally = (await self.store.shards.progress([self.batch_id])).get(self.batch_id)
        counts = {}
        if tally is not None:
            counts["request_counts"] = BatchRequestCounts(total=total, completed=tally.completed, failed=tally.failed)
        await self._move(closed, errors=Errors(object="list", data=errors), **counts)

    async def _every_request_has_a_result(self) -> bool:
        if not await self.store.shards.exist(self.batch_id):
            return False
        state = await self.store.shards.state(self.batch_id)
        return state.open == 0

    async def _run(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if batch.status == "validating":
            validated = await self._validate(batch)
            if validated is None:  # refused, or expired before it could start
                return
            batch = validated
        total = batch.request_counts.total if batch.request_counts else 0
        if batch.status in ("cancelling", "finalizing"):
            await self._close_when_quiet(batch, "completed", total)
        elif self._past_deadline(batch):
            await self._close_when_quiet(batch, "expired", total, formats.expired_line)
        elif stored.request_credentials and not carries_request_credentials():
            # Running the rest under the server's own credentials would bill or expose the wrong account.
            await self._close_when_quiet(batch, "completed", total, formats.credentials_unavailable_line)
        else:
            await self._run_requests(batch, total)

    async def _close_when_quiet(
        self, batch: BatchObject, outcome: Outcome, total: int, unrun: UnrunLine | None = None, **fields: Any
    ) -> None:
        """Close the batch once no process runs a shard of it: no result may be written after its files."""
        if await self._shards_quiet(batch) not in (Stop.SHUTDOWN, Stop.LEASE_LOST):
            await self._finalizer().close(outcome, total, unrun, **fields)

    async def _run_requests(self, batch: BatchObject, total: int) -> None:
        # Just validated in this run: the checked file is at hand, reading and parsing it again is waste.
        input_index = InputOnDemand(self.files, batch, self._validated)
        self._validated = None
        try:
            if not await self.store.shards.exist(self.batch_id):  # in progress under an earlier release
                await self._split(batch, None, len(await input_index.get()))
            stop = await self._run_own_shards(batch, input_index)
            if stop not in (Stop.SHUTDOWN, Stop.LEASE_LOST):
                quiet = await self._shards_quiet(batch, input_index, until_done=stop is None)
                stop = quiet if quiet in (Stop.SHUTDOWN, Stop.LEASE_LOST) else stop or quiet
        except InputFileGone:
            logger.error("Input file gone; the batch ends failed", batch_id=self.batch_id)
            message = f"The input file {batch.input_file_id!r} cannot be read any more; the batch cannot go on."
            errors = [file_error(message, code="input_file_unavailable")]
            await self._close_when_quiet(batch, "failed", total, formats.input_unavailable_line, errors=errors)
            return
        input_index.forget()  # the input is not needed any more: free it before the result files are built
        if stop in (Stop.SHUTDOWN, Stop.LEASE_LOST):
            return
        unrun: UnrunLine | None = formats.expired_line if stop is Stop.EXPIRED else None
        await self._finalizer().close("expired" if stop is Stop.EXPIRED else "completed", total, unrun)

    async def _run_own_shards(self, batch: BatchObject, input_index: "InputOnDemand") -> Stop | None:
        """Run free shards of this batch until none is left; return why it stopped early, if it did.

        The next shard is claimed as soon as the current one has sent its last request, and runs
        beside that one's last requests (at most OVERLAPPING_RUNS runs at once; the batch's window
        is shared between them, scheduler.Flow): the window does not drain at every shard's end.
        """
        running: set[asyncio.Task[Stop | None]] = set()
        stop: Stop | None = None
        try:
            while stop is None and not self._stop_asked():
                if len(running) >= OVERLAPPING_RUNS:
                    stop = await self._first_ended(running, wait_for=set())
                    continue
                shard = await self.store.shards.claim(self.holder, self.settings.lease_seconds, batch_id=self.batch_id)
                if shard is None:
                    break
                run = self._shard_run(shard, batch, await input_index.get())
                running.add(asyncio.create_task(run.run()))
                all_sent = asyncio.create_task(run.all_sent.wait())
                try:
                    stop = await self._first_ended(running, wait_for={all_sent})
                finally:
                    all_sent.cancel()
            while running and stop is None:
                stop = await self._first_ended(running, wait_for=set())
        finally:
            if running:  # a stop reaches every run (the events they share); each ends on its own
                await asyncio.gather(*running, return_exceptions=True)
        return stop if stop is not None else self._why_stopped(batch)

    async def _first_ended(
        self, running: set[asyncio.Task[Stop | None]], wait_for: set[asyncio.Task[Any]]
    ) -> Stop | None:
        """Wait until a run ends (or one of `wait_for` is done); why a run that ended stopped early, if it did.

        A run whose shard moved to another process (its own lease lost) is no reason to stop.
        """
        done, _ = await asyncio.wait(running | wait_for, return_when=asyncio.FIRST_COMPLETED)
        stop: Stop | None = None
        for task in done & running:
            running.discard(task)
            ended = task.result()
            if ended is Stop.LEASE_LOST and not self.lease_lost.is_set():
                continue
            if stop is None:
                stop = ended
        return stop

    def _shard_run(self, shard: ShardLease, batch: BatchObject, index: InputIndex) -> ShardRun:
        return ShardRun(
            shard,
            batch,
            index,
            self.store,
            self.sender,
            self.settings,
            self.cancel_requested,
            self.stopping,
            self.scheduler,
            self._owner_scope,
            self.clock,
            batch_lease_lost=self.lease_lost,
            unstored=self._unstored,
        )

    async def _shards_quiet(
        self, batch: BatchObject, input_index: "InputOnDemand | None" = None, until_done: bool = False
    ) -> Stop | None:
        """Wait until no process holds a shard of this batch and, with `until_done`, every shard is done
        (running here any that a stopped process left); return why the batch stopped early, if it did.
        Others notice a cancel or the deadline at their next heartbeat and stop within the grace
        period; the lease of a dead one runs out."""
        while True:
            if self.stopping.is_set() or self.lease_lost.is_set():
                return self._why_stopped(batch)
            if self.cancel_requested.is_set() or self._past_deadline(batch):
                until_done = False  # only the others' quiet is awaited now
            state = await self.store.shards.state(self.batch_id)
            if state.held == 0 and (not until_done or state.open == 0):
                return self._why_stopped(batch)
            if state.held == 0 and input_index is not None:  # not done, nobody's: its process stopped
                stop = await self._run_own_shards(batch, input_index)
                if stop is not None:
                    return stop
            await asyncio.sleep(SHARDS_POLL_SECONDS)

    def _stop_asked(self) -> bool:
        return self.cancel_requested.is_set() or self.stopping.is_set() or self.lease_lost.is_set()

    def _why_stopped(self, batch: BatchObject) -> Stop | None:
        if self.lease_lost.is_set():
            return Stop.LEASE_LOST
        if self.stopping.is_set():
            return Stop.SHUTDOWN
        if self.cancel_requested.is_set():
            return Stop.CANCELLED
        return Stop.EXPIRED if self._past_deadline(batch) else None

    async def _split(self, batch: BatchObject, parsed: ParsedInput | None, total: int) -> OverTokenLimit | None:
        """Write the batch's shards (with their token estimates under a token quota); what passes a limit."""
        ranges = split(total, self.settings.requests_per_shard)
        limit = self.settings.token_limit
        tokens = None
        if parsed is not None and limit is not None:
            tokens = ShardTokens(self._owner_scope, parsed.tokens_per_shard(ranges), limit)
        return await self.store.shards.create(batch, ranges, batch.created_at * 10**9, self._shareable, tokens)

    # --- validation -----------------------------------------------------------------------------

    async def _validate(self, batch: BatchObject) -> BatchObject | None:
        """Check the input file; store the custom_ids and move to in_progress. None if the batch ended here."""
        estimate = None
        if self.settings.token_limit is not None:
            estimate = body_estimator(batch.endpoint, self.settings.token_encodings)
        parsed = (
            None if self._past_deadline(batch) else await read_checked_input(self.files, self.apis, batch, estimate)
        )
        if parsed is None or self._past_deadline(batch):
            # Before or while it was checked: no request ran, and none will.
            await self._finalizer().close("expired", 0)
            return None
        estimated = {"estimated_input_tokens": sum(parsed.token_estimates)} if estimate is not None else {}
        if parsed.errors:
            first = parsed.errors[0]
            logger.info(
                "Batch failed validation",
                batch_id=self.batch_id,
                problems=len(parsed.errors),
                first=f"{first.code} at line {first.line}: {first.message}",
            )
            await self._refuse(parsed.errors[: MAX_LISTED_ERRORS + 1])
            return None
        await self.store.request_ids.save(self.batch_id, parsed.custom_ids)
        over = await self._split(batch, parsed, len(parsed.custom_ids))
        if over is not None:
            logger.info("Batch over its owner's token limit", batch_id=self.batch_id, model=over.model)
            await self.store.request_ids.delete(self.batch_id)
            await self._refuse([BatchError(code="token_limit_exceeded", message=over.message())], **estimated)
            return None
        self._validated = parsed.index
        counts = BatchRequestCounts(total=len(parsed.custom_ids), completed=0, failed=0)
        try:
            return await self._move("in_progress", request_counts=counts, model=parsed.model, **estimated)
        except IllegalTransitionError:  # cancelled while it was checked: no request will run
            await self.store.request_ids.delete(self.batch_id)
            return await self.store.get_batch(self.batch_id)

    async def _refuse(self, errors: list[BatchError], **fields: Any) -> None:
        """End the batch `failed` at validation with `errors` (cancelled meanwhile: cancelled)."""
        now = self._now()
        listed = Errors(object="list", data=errors)
        refuse = lambda b: transition(b, final_status(b, "failed"), now, errors=listed, **fields)  # noqa: E731
        await self.store.update(self.batch_id, refuse, self.lease)


class InputOnDemand:
    """A batch's requests, read from its input file the first time they are needed, then kept."""

    def __init__(self, files: Files, batch: BatchObject, index: InputIndex | None = None) -> None:
        self._files = files
        self._batch = batch
        self._index = index

    async def get(self) -> InputIndex:
        """The requests; InputFileGone if the file cannot be read any more."""
        if self._index is None:
            self._index = await read_requests(self._files, self._batch)
        return self._index

    def forget(self) -> None:
        self._index = None
