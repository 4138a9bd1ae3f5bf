"""Scheduling batch jobs: the concurrency limit across batches, retries after internal errors, and
several servers (replicas) sharing one SQL store: work spreading, cancels and lost leases."""

import asyncio
import errno
import time
from typing import Any

import psycopg2
import pytest

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.api.idempotency import CreateParams
from llama_stack_provider_batches.domain.outages import DependencyGate
from llama_stack_provider_batches.domain.results import decode_results
from llama_stack_provider_batches.engine.parking import TooManyWaitingBatchesError
from llama_stack_provider_batches.stack import RequestProviderDataContext, User
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels, ProviderFactory
from tests.unit.helpers import (
    CHAT,
    chat_line,
    create_chat_batch,
    hold_requests,
    jsonl,
    occupy_the_only_slot,
    read_lines,
    restarted,
    run_batch,
    running_settles_to,
    start_batch,
    wait_for_status,
    wait_until_completed,
)


async def test_batches_beyond_the_limit_wait_their_turn(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=1)
    gate = hold_requests(inference)
    first = await create_chat_batch(provider, files, [chat_line("a")])
    second = await create_chat_batch(provider, files, [chat_line("b")])
    # Until the first runs (not a fixed time: a loaded CI machine took longer than 0.2 s), then a little more.
    await wait_for_status(provider, first.id, "in_progress", seconds=10)
    await asyncio.sleep(0.2)
    assert (await provider.retrieve_batch(first.id)).status == "in_progress"
    assert (await provider.retrieve_batch(second.id)).status == "validating"
    gate.set()
    await provider._runner.wait_idle()
    assert (await provider.retrieve_batch(second.id)).status == "completed"
    await provider.shutdown()


async def test_an_internal_error_is_retried_without_losing_results(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(job_retry_initial_seconds=0.01)
    real_upload = files.openai_upload_file
    failures = []

    async def flaky_upload(request: Any, file: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OSError("disk full")
        return await real_upload(request, file)

    monkeypatch.setattr(files, "openai_upload_file", flaky_upload)
    batch = await run_batch(provider, files, [chat_line(f"r{i}") for i in range(5)])
    assert failures == [1]
    assert batch.status == "completed"
    assert len(read_lines(files, batch.output_file_id)) == 5
    await provider.shutdown()


# --- poison batches -----------------------------------------------------------------------------


def broken_file_reads(files: FakeFiles, monkeypatch: pytest.MonkeyPatch, file_id: str) -> list[str]:
    """Make every metadata read of `file_id` raise as a bug would; return the list of reads made."""
    reads: list[str] = []
    real_retrieve = files.openai_retrieve_file

    async def retrieve(request: Any) -> Any:
        if request.file_id == file_id:
            reads.append(file_id)
            raise RecursionError("maximum recursion depth exceeded")
        return await real_retrieve(request)

    monkeypatch.setattr(files, "openai_retrieve_file", retrieve)
    return reads


async def test_a_batch_that_fails_every_attempt_ends_failed_and_frees_its_slot(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(max_concurrent_batches=1, max_job_attempts=3, job_retry_initial_seconds=0.01)
    poison_file = files.add(jsonl([chat_line("p")]))
    reads = broken_file_reads(files, monkeypatch, poison_file)
    poison = await provider.create_batch(input_file_id=poison_file, endpoint=CHAT, completion_window="24h")
    after = await start_batch(provider, files, 3)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)

    failed = await provider.retrieve_batch(poison.id)
    assert failed.status == "failed" and failed.failed_at is not None
    [error] = failed.errors.data
    assert error.code == "batch_processing_failed"
    assert "failed 3 times" in error.message and "RecursionError" in error.message
    assert len(reads) == 1 + 3  # the purpose check at create, then the attempts
    assert (await provider.retrieve_batch(after.id)).status == "completed"
    assert await provider._store.waiting_ids(10) == []
    await provider.shutdown()


async def test_the_failure_count_survives_a_restart(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"max_job_attempts": 4, "job_retry_initial_seconds": 0.01, "job_retry_max_seconds": 0.01}
    poison_file = files.add(jsonl([chat_line("p")]))
    reads = broken_file_reads(files, monkeypatch, poison_file)
    first = await make_provider(**settings)
    poison = await first.create_batch(input_file_id=poison_file, endpoint=CHAT, completion_window="24h")
    while len(reads) < 3:
        await asyncio.sleep(0.005)
    await first.shutdown()
    reads_before_restart = len(reads)

    second = await make_provider(**settings)
    second.start()
    await asyncio.wait_for(second._runner.wait_idle(), timeout=10)
    assert (await second.retrieve_batch(poison.id)).status == "failed"
    assert len(reads) == 1 + 4  # the purpose check at create, then the attempts, those before the restart too
    assert reads_before_restart < 1 + 4  # the first server stopped before it used up the attempts
    await second.shutdown()


async def test_a_failing_batch_keeps_the_results_it_stored(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(max_job_attempts=2, job_retry_initial_seconds=0.01)
    from llama_stack_provider_batches.engine.result_log import ResultLog

    real = ResultLog.report_progress
    stored_results: list[int] = []

    async def refuse_after_five(log: ResultLog) -> None:
        if log.tally.completed >= 5:  # as if the store refused the record from here on
            stored_results.append(log.tally.completed)
            raise ValueError("record refused")
        await real(log)

    monkeypatch.setattr(ResultLog, "report_progress", refuse_after_five)
    inference.stall_after(5, seconds=0.05)
    batch = await start_batch(provider, files, 20)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=20)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "failed"
    assert final.errors.data[0].code == "batch_processing_failed" and "record refused" in final.errors.data[0].message
    kept = read_lines(files, final.output_file_id)
    assert len(kept) >= 5 and len(kept) == final.request_counts.completed
    assert final.request_counts.total == 20
    await provider.shutdown()


async def test_an_outage_of_the_file_store_is_waited_out_and_never_counted_as_a_failure(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(max_job_attempts=2, job_retry_initial_seconds=0.01)
    gates = fast_gate(provider)
    input_file = files.add(jsonl([chat_line(f"q{i}") for i in range(3)]))
    real_retrieve = files.openai_retrieve_file
    reads: list[str] = []

    async def unreadable_for_a_while(request: Any) -> Any:
        if request.file_id == input_file:
            reads.append(request.file_id)
            if 1 < len(reads) <= 6:  # the create's check passes, then five reads meet the outage
                raise OSError(errno.EROFS, "Read-only file system")
        return await real_retrieve(request)

    monkeypatch.setattr(files, "openai_retrieve_file", unreadable_for_a_while)
    batch = await provider.create_batch(input_file_id=input_file, endpoint=CHAT, completion_window="24h")
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "completed" and final.request_counts.completed == 3
    assert len(reads) > 6 and sum(gate.outages for gate in gates) >= 1
    assert (await provider._store.get(batch.id)).processing_failures == 0
    await provider.shutdown()


async def test_a_registry_outage_during_validation_is_waited_out_not_an_unknown_model(
    make_provider: ProviderFactory, files: FakeFiles, models: FakeModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run-replicas.yaml keeps the model registry in PostgreSQL: a restart there is no verdict on the model.
    provider = await make_provider(max_job_attempts=1, job_retry_initial_seconds=0.01)
    gates = fast_gate(provider)
    real_get_model = models.get_model
    lookups: list[str] = []

    async def registry_restarting(request: Any) -> Any:
        lookups.append(request.model_id)
        if len(lookups) <= 3:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        return await real_get_model(request)

    monkeypatch.setattr(models, "get_model", registry_restarting)
    batch = await start_batch(provider, files, 3)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "completed" and final.request_counts.completed == 3
    assert len(lookups) > 3 and sum(gate.outages for gate in gates) >= 1
    await provider.shutdown()


async def test_an_input_file_the_store_cannot_read_for_a_while_is_not_a_missing_file(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EACCES from a volume mounted wrongly for a moment is the store's outage, not "you do not have access".
    provider = await make_provider(max_job_attempts=1, job_retry_initial_seconds=0.01)
    fast_gate(provider)
    input_file = files.add(jsonl([chat_line(f"q{i}") for i in range(3)]))
    real_content = files.openai_retrieve_file_content
    reads: list[str] = []

    async def denied_for_a_while(request: Any) -> Any:
        reads.append(request.file_id)
        if len(reads) <= 2:
            raise PermissionError(errno.EACCES, "Permission denied")
        return await real_content(request)

    monkeypatch.setattr(files, "openai_retrieve_file_content", denied_for_a_while)
    batch = await provider.create_batch(input_file_id=input_file, endpoint=CHAT, completion_window="24h")
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "completed" and final.request_counts.completed == 3
    await provider.shutdown()


def fast_gate(provider: BatchesService) -> list[DependencyGate]:
    """Give the provider's engine gates with pauses of milliseconds; return those its jobs made."""
    provider._runner._sender.gate = DependencyGate(initial_pause=0.005, max_pause=0.01)
    made: list[DependencyGate] = []

    def make() -> DependencyGate:
        made.append(DependencyGate(initial_pause=0.005, max_pause=0.01))
        return made[-1]

    provider._runner._attempts._make_gate = make
    return made


def unwritable_uploads(
    files: FakeFiles,
    monkeypatch: pytest.MonkeyPatch,
    failures: int,
    error: Exception | None = None,
) -> list[str]:
    """Make the first `failures` uploads raise `error` (by default as a read-only files directory does);
    return the names of the uploads tried."""
    error = error or PermissionError(errno.EACCES, "Permission denied")
    real_upload = files.openai_upload_file
    tried: list[str] = []

    async def upload(request: Any, file: Any) -> Any:
        tried.append(file.filename)
        if len(tried) <= failures:
            raise error
        return await real_upload(request, file)

    monkeypatch.setattr(files, "openai_upload_file", upload)
    return tried


async def test_a_file_store_outage_at_finalization_is_waited_out_and_the_files_appear(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(max_job_attempts=1)
    fast_gate(provider)
    tried = unwritable_uploads(files, monkeypatch, failures=8)
    batch = await start_batch(provider, files, 3)
    while len(tried) < 4:
        await asyncio.sleep(0.005)
    meanwhile = await provider.retrieve_batch(batch.id)
    assert meanwhile.status == "finalizing"
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "completed" and final.request_counts.completed == 3
    assert len(read_lines(files, final.output_file_id)) == 3
    assert len(tried) == 9  # eight refused, then the one upload
    await provider.shutdown()


async def test_a_file_store_outage_past_the_deadline_and_grace_ends_failed_with_its_counts(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(outage_grace_seconds=60)
    fast_gate(provider)
    unwritable_uploads(files, monkeypatch, failures=10**6)
    batch = await start_batch(provider, files, 3)
    provider._runner._attempts._clock = lambda: batch.expires_at + 61  # as if the outage lasted that long
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "failed" and final.output_file_id is None
    [error] = final.errors.data
    assert error.code == "batch_processing_failed" and "did not answer" in error.message
    assert (final.request_counts.total, final.request_counts.completed) == (3, 3)
    await provider.shutdown()


async def test_the_results_of_a_batch_that_gave_up_on_the_file_store_stay_until_its_retention(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(outage_grace_seconds=60, retention_days=1)
    fast_gate(provider)
    unwritable_uploads(files, monkeypatch, failures=10**6)
    batch = await start_batch(provider, files, 3)
    provider._runner._attempts._clock = lambda: batch.expires_at + 61  # as if the outage lasted that long
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    assert (await provider.retrieve_batch(batch.id)).status == "failed"
    keeper = provider._runner.housekeeper
    assert keeper is not None
    await keeper.sweep()  # as every process does every minute
    kept = [chunk async for chunk in provider._store.results.read(batch.id)]
    assert sum(len(decode_results(chunk)) for chunk in kept) == 3  # readable, as its error message says
    keeper.clock = lambda: time.time() + 2 * 86400  # its record's retention has passed
    await keeper.sweep()
    assert await provider._store.get(batch.id) is None
    assert not [chunk async for chunk in provider._store.results.read(batch.id)]
    await provider.shutdown()


async def test_a_batch_whose_every_request_has_a_result_never_ends_failed(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(max_job_attempts=1)
    # A failure of no dependency: it counts, and it is the last one allowed.
    unwritable_uploads(files, monkeypatch, failures=1, error=ValueError("upload refused"))
    batch = await start_batch(provider, files, 3)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "completed" and final.errors is None
    assert len(read_lines(files, final.output_file_id)) == 3
    await provider.shutdown()


async def test_a_batch_that_makes_progress_between_failures_starts_counting_again(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"max_job_attempts": 2, "job_retry_initial_seconds": 0.01, "max_concurrent_requests_per_batch": 1}
    provider = await make_provider(**settings)
    from llama_stack_provider_batches.engine.result_log import ResultLog

    real = ResultLog.report_progress
    failed_at: set[int] = set()

    async def fail_once_every_five(log: ResultLog) -> None:
        await real(log)  # the progress is stored, then the job fails: three failures, progress between each
        step = log.tally.completed // 5
        if 0 < step < 4 and step not in failed_at:
            failed_at.add(step)
            raise RuntimeError(f"failure {step}")

    monkeypatch.setattr(ResultLog, "report_progress", fail_once_every_five)
    inference.stall_after(0, seconds=0.1)  # one at a time: progress is reported every few results
    batch = await start_batch(provider, files, 20)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=20)
    final = await provider.retrieve_batch(batch.id)
    assert len(failed_at) == 3  # more failures than max_job_attempts, each after progress
    assert final.status == "completed" and final.request_counts.completed == 20
    await provider.shutdown()


async def test_a_failing_batch_can_be_cancelled(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"max_job_attempts": 1000, "job_retry_initial_seconds": 0.02, "job_retry_max_seconds": 0.02}
    provider = await make_provider(**settings)
    poison_file = files.add(jsonl([chat_line("p")]))
    reads = broken_file_reads(files, monkeypatch, poison_file)
    poison = await provider.create_batch(input_file_id=poison_file, endpoint=CHAT, completion_window="24h")
    while len(reads) < 2:
        await asyncio.sleep(0.005)
    assert (await provider.cancel_batch(poison.id)).status == "cancelling"
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=5)
    cancelled = await provider.retrieve_batch(poison.id)
    assert cancelled.status == "cancelled"
    reads_at_end = len(reads)
    await asyncio.sleep(0.1)
    assert len(reads) == reads_at_end  # nothing is tried any more
    await provider.shutdown()


# --- batches with per-request credentials ------------------------------------------------------


async def test_batches_with_credentials_wait_their_turn_in_creation_order(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=1)
    start = int(time.time())
    clock = iter(range(start, start + 1_000))
    provider._clock = lambda: float(next(clock))  # one second apart: creation order is unambiguous
    first, gate = await occupy_the_only_slot(provider, files, inference)
    plain = await create_chat_batch(provider, files, [chat_line("a", "plain")])
    with RequestProviderDataContext({"openai_api_key": "sk-user"}):
        pinned = [await create_chat_batch(provider, files, [chat_line("a", f"pinned {n}")]) for n in range(3)]
    await asyncio.sleep(0.1)
    assert provider._runner.running() == [first.id]  # the pinned batches wait like any other
    gate.set()
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    prompts = [str(call["messages"]) for call in inference.calls]
    order = [next((tag for tag in ("plain", "pinned 0", "pinned 1", "pinned 2") if tag in p), "first") for p in prompts]
    assert order == ["first", "plain", "pinned 0", "pinned 1", "pinned 2"]
    for batch in (plain, *pinned):
        assert (await provider.retrieve_batch(batch.id)).status == "completed"
    await provider.shutdown()


async def test_batches_with_credentials_waiting_on_one_server_are_bounded(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=1, max_waiting_batches_with_credentials=2)
    await occupy_the_only_slot(provider, files, inference)
    with RequestProviderDataContext({"openai_api_key": "sk-user"}):
        for _ in range(2):
            await start_batch(provider, files, 1)
        with pytest.raises(TooManyWaitingBatchesError) as refused:
            await start_batch(provider, files, 1)
    assert refused.value.status_code == 429
    assert len(provider._runner.running()) == 1
    await provider.shutdown()


async def test_a_server_stop_leaves_batches_resumable_and_a_start_resumes_them(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    async def slow(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)

    inference.behaviour = slow
    first = await make_provider(shutdown_grace_seconds=2, max_concurrent_batches=1)
    running = await start_batch(first, files, 100)
    waiting = await create_chat_batch(first, files, [chat_line("w")])
    await wait_until_completed(first, running.id, 20)
    await first.shutdown()
    stopped = await first.retrieve_batch(running.id)
    assert stopped.status == "in_progress"
    assert (await first.retrieve_batch(waiting.id)).status == "validating"
    assert stopped.request_counts.completed == len(inference.calls)  # in-flight requests finished and were stored

    second = await restarted(make_provider)
    done = await second.retrieve_batch(running.id)
    assert done.status == "completed"
    assert sorted(line["custom_id"] for line in read_lines(files, done.output_file_id)) == sorted(
        f"r{i}" for i in range(100)
    )
    assert len(inference.calls) == 101  # nothing ran twice
    assert (await second.retrieve_batch(waiting.id)).status == "completed"
    assert await second._store.waiting_ids(10) == []
    assert second._runner.running() == []
    await second.shutdown()


async def test_claims_are_retried_while_the_store_fails(
    provider: BatchesService, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_stack_provider_batches.engine import runner as engine

    monkeypatch.setattr(engine, "RETRY_DELAYS_SECONDS", (0.01,))
    params = CreateParams(files.add(jsonl([chat_line("a")])), CHAT, "24h", None)
    stored, _ = await provider._store.create(provider._new_batch(params, owner=None, key=None))  # as before a restart
    real_claim = provider._store.claim
    failures: list[int] = []

    async def flaky_claim(*args: Any, **kwargs: Any) -> list[Any]:
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("store not reachable yet")
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(provider._store, "claim", flaky_claim)
    provider.start()
    await provider._runner.wait_idle()
    assert failures == [1, 1]
    assert (await provider.retrieve_batch(stored.batch.id)).status == "completed"


# --- several servers on one SQL store -----------------------------------------------------------


async def test_idle_replicas_pick_up_waiting_batches(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    gate = hold_requests(inference)
    first = await make_replica()
    second = await make_replica()
    second.start()
    batches = [await create_chat_batch(first, files, [chat_line(f"{n}")]) for n in range(2)]
    # One batch at a time each: the second server takes whichever the first is not running at its
    # next look (every second).
    for _ in range(40):
        if first._runner.running() and second._runner.running():
            break
        await asyncio.sleep(0.05)
    assert sorted(first._runner.running() + second._runner.running()) == sorted(b.id for b in batches)
    gate.set()
    for provider in (first, second):
        await provider._runner.wait_idle()
    assert [(await second.retrieve_batch(b.id)).status for b in batches] == ["completed", "completed"]
    await first.shutdown()
    await second.shutdown()


async def test_a_cancel_through_another_replica_stops_the_batch_where_it_runs(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    inference.stall_after(3)
    running_here = await make_replica(cancel_grace_seconds=0.1)
    elsewhere = await make_replica()
    batch = await start_batch(running_here, files, 10)
    while len(inference.calls) < 4:
        await asyncio.sleep(0.01)
    cancelled_at = time.monotonic()
    await elsewhere.cancel_batch(batch.id)
    await running_here._runner.wait_idle()
    assert time.monotonic() - cancelled_at < 2  # a heartbeat (0.2 s here) and the grace period
    final = await elsewhere.retrieve_batch(batch.id)
    assert final.status == "cancelled" and final.request_counts.completed == 3
    await running_here.shutdown()
    await elsewhere.shutdown()


async def test_a_job_that_loses_its_lease_stops_and_the_next_holder_finishes_the_batch(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    inference.stall_after(5)
    first = await make_replica()
    batch = await start_batch(first, files, 20)
    await wait_until_completed(first, batch.id, 5)

    async def cut_off(*_: Any) -> None:  # as if the database said another server holds the lease
        return None

    monkeypatch.setattr(first._store, "renew", cut_off)
    monkeypatch.setattr(first._store.shards, "renew", cut_off)
    monkeypatch.setattr(first._store, "claim", lambda *_: asyncio.sleep(0, result=[]))
    monkeypatch.setattr(first._store.shards, "claim", lambda *_, **__: asyncio.sleep(0, result=None))
    await asyncio.wait_for(first._runner.wait_idle(), timeout=5)  # stops without writing anything
    assert (await first.retrieve_batch(batch.id)).status == "in_progress"

    inference.behaviour = None
    second = await make_replica()
    second.start()  # claims the batch once the stale lease expires (1 s)
    while (await second.retrieve_batch(batch.id)).status != "completed":
        await asyncio.sleep(0.1)
    final = await second.retrieve_batch(batch.id)
    assert sorted(line["custom_id"] for line in read_lines(files, final.output_file_id)) == sorted(
        f"r{i}" for i in range(20)
    )
    assert final.request_counts.completed == 20
    await first.shutdown()
    await second.shutdown()


async def test_setting_sql_store_on_a_single_server_keeps_its_batches(
    make_provider: ProviderFactory, make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    inference.stall_after(5)
    single = await make_provider(shutdown_grace_seconds=0.1)
    finished = await run_batch(single, files, [chat_line("f0")])
    inference.calls.clear()
    running = await start_batch(single, files, 20)
    await wait_until_completed(single, running.id, 5)
    await single.shutdown()  # the operator adds `sql_store` to run.yaml and restarts

    inference.behaviour = None
    calls_before = len(inference.calls)
    replica = await restarted(make_replica)
    done = await replica.retrieve_batch(running.id)
    assert done.status == "completed" and done.request_counts.completed == 20
    assert sorted(line["custom_id"] for line in read_lines(files, done.output_file_id)) == sorted(
        f"r{i}" for i in range(20)
    )
    assert len(inference.calls) - calls_before == 15  # the 5 stored results were not asked again
    assert (await replica.retrieve_batch(finished.id)).status == "completed"
    await replica.shutdown()


async def test_a_server_that_cannot_renew_its_lease_stops_once_the_lease_may_have_passed(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    inference.stall_after(3)
    provider = await make_replica()  # leases of 1 s
    batch = await start_batch(provider, files, 10)
    while len(inference.calls) < 4:
        await asyncio.sleep(0.01)

    async def unreachable(*_: Any) -> None:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(provider._store, "renew", unreachable)
    monkeypatch.setattr(provider._store.shards, "renew", unreachable)
    monkeypatch.setattr(provider._store, "claim", lambda *_: asyncio.sleep(0, result=[]))
    monkeypatch.setattr(provider._store.shards, "claim", lambda *_, **__: asyncio.sleep(0, result=None))
    cut_off_at = time.monotonic()
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=5)
    assert time.monotonic() - cut_off_at <= 1.5  # within the lease, plus a heartbeat
    assert (await provider.retrieve_batch(batch.id)).status == "in_progress"  # left to whoever claims it next
    await provider.shutdown()


# --- batches that need no slot -------------------------------------------------------------------


async def test_a_waiting_batch_is_cancelled_without_waiting_for_a_slot(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=1)
    running, _ = await occupy_the_only_slot(provider, files, inference)
    waiting = await start_batch(provider, files, 3)
    await provider.cancel_batch(waiting.id)
    assert (await wait_for_status(provider, waiting.id, "cancelled")).status == "cancelled"
    assert await running_settles_to(provider, [running.id]) == [running.id]
    assert len(inference.calls) == 1
    await provider.shutdown()


async def test_a_waiting_batch_expires_without_waiting_for_a_slot(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_stack_provider_batches.engine import runner as engine

    monkeypatch.setattr(engine, "SWEEP_PASSES", 1)
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.02)
    provider = await make_provider(max_concurrent_batches=1)
    running, _ = await occupy_the_only_slot(provider, files, inference)
    waiting = await start_batch(provider, files, 3)
    provider._runner._clock = lambda: time.time() + 2 * 86400
    expired = await wait_for_status(provider, waiting.id, "expired")
    assert expired.status == "expired" and expired.request_counts.total == 0
    assert await running_settles_to(provider, [running.id]) == [running.id]
    assert len(inference.calls) == 1
    await provider.shutdown()


async def test_a_record_that_cannot_be_read_does_not_stop_other_batches(
    make_provider: ProviderFactory, files: FakeFiles
) -> None:
    provider = await make_provider(max_concurrent_batches=1, max_job_attempts=2, job_retry_initial_seconds=0.01)
    params = CreateParams(files.add(jsonl([chat_line("a")])), CHAT, "24h", None)
    broken, _ = await provider._store.create(provider._new_batch(params, owner=None, key=None))
    table = provider._store._table
    await provider._store._db.write(table.update().where(table.c.id == broken.batch.id).values(record='{"batch": "g'))
    after = await start_batch(provider, files, 2)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=10)
    assert (await provider.retrieve_batch(after.id)).status == "completed"
    assert provider._runner.running() == []
    await provider.shutdown()


async def test_creates_racing_two_servers_claim_loops_leave_no_batch_behind_and_list_each_once(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    servers = [await make_replica(max_concurrent_batches=4) for _ in "ab"]
    for server in servers:
        server.start()
    file_id = files.add(jsonl([chat_line("a")]))
    created = await asyncio.gather(
        *(
            servers[n % 2].create_batch(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
            for n in range(200)
        )
    )
    for server in servers:
        await asyncio.wait_for(server._runner.wait_idle(), timeout=90)
    statuses = [(await servers[1].retrieve_batch(batch.id)).status for batch in created]
    assert statuses == ["completed"] * 200
    assert len(inference.calls) == 200  # each batch ran once, on one of the two
    listed, after = [], None
    while True:
        page = await servers[0].list_batches(after=after, limit=37)
        listed.extend(batch.id for batch in page.data)
        if not page.has_more:
            break
        after = page.last_id
    assert sorted(listed) == sorted(batch.id for batch in created)
    for server in servers:
        await server.shutdown()


async def test_concurrent_creates_with_credentials_respect_the_waiting_bound(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=1, max_waiting_batches_with_credentials=2)
    _, gate = await occupy_the_only_slot(provider, files, inference)

    async def create() -> Any:
        with RequestProviderDataContext({"openai_api_key": "sk-user"}):
            return await start_batch(provider, files, 1)

    results = await asyncio.gather(*(create() for _ in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, TooManyWaitingBatchesError)]
    assert len(refused) == 18 and len(results) - len(refused) == 2
    gate.set()
    await provider.shutdown()


async def test_a_batch_with_credentials_cancelled_through_another_server_is_closed_where_it_waits(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    here = await make_replica(max_concurrent_batches=1)
    elsewhere = await make_replica(max_concurrent_batches=1)
    _, gate = await occupy_the_only_slot(here, files, inference)
    with RequestProviderDataContext({"openai_api_key": "sk-user"}):
        parked = await start_batch(here, files, 1)
    await elsewhere.cancel_batch(parked.id)
    assert (await wait_for_status(here, parked.id, "cancelled", seconds=4)).status == "cancelled"
    gate.set()
    await here.shutdown()
    await elsewhere.shutdown()


async def test_a_quarter_of_the_slots_is_kept_for_users_with_nothing_running(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=4)
    gate = hold_requests(inference)
    alice, bob = User("alice", {"teams": ["red"]}), User("bob", {"teams": ["blue"]})
    with RequestProviderDataContext(user=alice):
        alices = [await start_batch(provider, files, 1) for _ in range(5)]
    await asyncio.sleep(0.5)
    assert len(provider._runner.running()) == 3  # the fourth slot waits for another user
    with RequestProviderDataContext(user=bob):
        bobs = await start_batch(provider, files, 1)
        assert (await wait_for_status(provider, bobs.id, "in_progress")).status == "in_progress"
    assert sorted(provider._runner.running()) == sorted([*(b.id for b in alices[:3]), bobs.id])
    gate.set()
    await provider._runner.wait_idle()
    with RequestProviderDataContext(user=alice):
        assert [(await provider.retrieve_batch(b.id)).status for b in alices] == ["completed"] * 5
    await provider.shutdown()
