"""The execution engine: takes a created batch through validation, execution and finalization.

    validating  read the input file through the Files API and check every line (input_file.py)
    in_progress run the requests through the inference API, at most `max_concurrent_requests_per_batch`
                in flight; a new one starts as soon as any finishes (a sliding window, not chunks)
    finalizing  upload `<batch_id>_output.jsonl` and `<batch_id>_error.jsonl`, then `completed`

A cancel stops dispatching at once; requests in flight finish, the partial results are uploaded and
the batch ends `cancelled`. At most `max_concurrent_batches` batches run; the others wait their
turn in the order they were submitted. Status changes go through lifecycle.transition.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any

from fastapi import UploadFile
from llama_stack.log import get_logger
from llama_stack_api import (
    BatchObject,
    Files,
    GetModelRequest,
    Inference,
    Models,
    OpenAIFilePurpose,
    RetrieveFileContentRequest,
    UploadFileRequest,
)
from openai.types.batch import Errors
from openai.types.batch_error import BatchError
from openai.types.batch_request_counts import BatchRequestCounts

from . import formats
from .config import BatchesProviderConfig
from .endpoints import call_endpoint, result_for_exception
from .input_file import ParsedInput, RequestLine, file_error, parse_input
from .lifecycle import BatchStatus, IllegalTransitionError, is_terminal, transition
from .store import BatchStore

logger = get_logger(name=__name__, category="providers")

PROGRESS_INTERVAL_SECONDS = 1.0


class BatchRunner:
    """Runs batches in the background of the server's event loop."""

    def __init__(
        self,
        store: BatchStore,
        config: BatchesProviderConfig,
        inference: Inference,
        files: Files,
        models: Models,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._config = config
        self._inference = inference
        self._files = files
        self._models = models
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: dict[str, asyncio.Event] = {}

    def _now(self) -> int:
        return int(self._clock())

    # --- control --------------------------------------------------------------------------------

    def submit(self, batch_id: str) -> None:
        """Start processing a batch unless it is already running here."""
        if batch_id in self._tasks:
            return
        self._cancel_requested[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._run(batch_id), name=f"batch:{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._forget(batch_id))

    def _forget(self, batch_id: str) -> None:
        self._tasks.pop(batch_id, None)
        self._cancel_requested.pop(batch_id, None)

    def request_cancel(self, batch_id: str) -> None:
        """Tell a running batch to stop dispatching; it then writes its partial results."""
        if event := self._cancel_requested.get(batch_id):
            event.set()

    async def wait_idle(self) -> None:
        """Wait until every submitted batch has stopped (tests and shutdown use this)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop every task without changing any batch's status, so that none is lost to a restart."""
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # --- one batch ------------------------------------------------------------------------------

    async def _move(self, batch_id: str, target: BatchStatus, **fields: Any) -> BatchObject:
        return await self._store.update(batch_id, lambda batch: transition(batch, target, self._now(), **fields))

    async def _run(self, batch_id: str) -> None:
        async with self._slots:
            try:
                await self._process(batch_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("Batch processing failed", batch_id=batch_id)
                error = BatchError(code="internal_error", message=f"{type(exc).__name__}: {exc}", line=None, param=None)
                with contextlib.suppress(IllegalTransitionError):
                    await self._store.update(batch_id, lambda b: _fail_or_close(b, error, self._now()))

    async def _process(self, batch_id: str) -> None:
        batch = await self._store.get_batch(batch_id)
        if is_terminal(batch.status):
            return
        if batch.status == "validating":
            parsed = await self._read_input(batch)
            if parsed.errors:
                await self._move(batch_id, "failed", errors=Errors(object="list", data=parsed.errors))
                return
            counts = BatchRequestCounts(total=len(parsed.requests), completed=0, failed=0)
            try:
                batch = await self._move(batch_id, "in_progress", request_counts=counts)
            except IllegalTransitionError:  # cancelled while validating: nothing ran
                await self._close(batch_id, [])
                return
            results = await self._execute(batch, parsed.requests)
        else:
            results = []
        await self._close(batch_id, results)

    async def _read_input(self, batch: BatchObject) -> ParsedInput:
        try:
            response = await self._files.openai_retrieve_file_content(
                RetrieveFileContentRequest(file_id=batch.input_file_id)
            )
        except Exception:
            return ParsedInput(errors=[file_error(f"Cannot find the input file {batch.input_file_id!r}.")])
        # Checking 50,000 lines takes a while: keep it off the event loop so the server stays responsive.
        parsed = await asyncio.to_thread(parse_input, bytes(response.body), batch.endpoint)
        if not parsed.errors:
            parsed.errors.extend(await self._unknown_models(parsed.requests))
        return parsed

    async def _unknown_models(self, requests: list[RequestLine]) -> list[BatchError]:
        """A model_not_found error for each distinct unknown model, at the first line that names it."""
        first_line: dict[str, int] = {}
        for request in requests:
            first_line.setdefault(request.model, request.line)
        errors = []
        for model, line in first_line.items():
            try:
                await self._models.get_model(GetModelRequest(model_id=model))
            except Exception:
                errors.append(
                    BatchError(
                        code="model_not_found",
                        line=line,
                        param="body.model",
                        message=f"The model {model!r} does not exist or is not available.",
                    )
                )
        return errors

    async def _execute(self, batch: BatchObject, requests: list[RequestLine]) -> list[dict[str, Any]]:
        """Run the requests with a sliding window; return the result lines of those that ran, in input order."""
        window = asyncio.Semaphore(self._config.max_concurrent_requests_per_batch)
        cancel = self._cancel_requested[batch.id]
        results: list[dict[str, Any] | None] = [None] * len(requests)
        tally = {"completed": 0, "failed": 0}

        async def run_one(index: int, request: RequestLine) -> None:
            try:
                body = await call_endpoint(self._inference, batch.endpoint, request.body)
                line = formats.success_line(request.custom_id, body)
            except Exception as exc:
                line = result_for_exception(request, exc)
            finally:
                window.release()
            results[index] = line
            tally["completed" if formats.is_success(line) else "failed"] += 1

        progress = asyncio.create_task(self._report_progress(batch.id, len(requests), tally))
        in_flight: list[asyncio.Task[None]] = []
        try:
            for index, request in enumerate(requests):
                await window.acquire()
                if cancel.is_set():
                    window.release()
                    break
                in_flight.append(asyncio.create_task(run_one(index, request)))
            await asyncio.gather(*in_flight)
        finally:
            progress.cancel()
            for task in in_flight:
                task.cancel()
        return [line for line in results if line is not None]

    async def _report_progress(self, batch_id: str, total: int, tally: dict[str, int]) -> None:
        reported: dict[str, int] = {}
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
            if tally != reported:
                reported = dict(tally)
                counts = BatchRequestCounts(total=total, **reported)
                await self._store.update(batch_id, lambda b, c=counts: b.model_copy(update={"request_counts": c}))

    async def _close(self, batch_id: str, results: list[dict[str, Any]]) -> None:
        """Upload the result files and end the batch `completed`, or `cancelled` if a cancel came in."""
        batch = await self._store.get_batch(batch_id)
        if batch.status == "in_progress":
            await self._move(batch_id, "finalizing")
        successes = [line for line in results if formats.is_success(line)]
        failures = [line for line in results if not formats.is_success(line)]
        output_file_id = await self._upload(batch_id, "output", successes)
        error_file_id = await self._upload(batch_id, "error", failures)
        fields = {
            "output_file_id": output_file_id,
            "error_file_id": error_file_id,
            "request_counts": BatchRequestCounts(
                total=batch.request_counts.total if batch.request_counts else len(results),
                completed=len(successes),
                failed=len(failures),
            ),
        }
        await self._store.update(
            batch_id,
            lambda b: transition(b, "cancelled" if b.status == "cancelling" else "completed", self._now(), **fields),
        )

    async def _upload(self, batch_id: str, kind: str, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        upload = UploadFile(file=BytesIO(formats.to_jsonl(lines)), filename=f"{batch_id}_{kind}.jsonl")
        uploaded = await self._files.openai_upload_file(
            request=UploadFileRequest(purpose=OpenAIFilePurpose.BATCH), file=upload
        )
        return uploaded.id


def _fail_or_close(batch: BatchObject, error: BatchError, now: int) -> BatchObject:
    """After an unexpected error: a batch still validating fails; a cancelling one ends cancelled."""
    if batch.status == "cancelling":
        return transition(batch, "cancelled", now)
    if batch.status == "validating":
        return transition(batch, "failed", now, errors=Errors(object="list", data=[error]))
    # Past validation OpenAI has no failed status; the work done so far must stay retrievable,
    # so the batch is left for a resume rather than marked with a status that throws it away.
    logger.error("Batch left in its status after an internal error", batch_id=batch.id, status=batch.status)
    return batch
