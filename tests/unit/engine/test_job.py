"""One batch's run over fake Files/Inference/Models APIs: statuses, result files, the sliding window,
cancel, expiry and resume."""

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from llama_stack_provider_batches import BatchesService
from llama_stack_provider_batches.domain.formats import success_line
from llama_stack_provider_batches.domain.results import ResultEntry, decode_results
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
    start_batch,
    wait_until_completed,
)


async def test_a_clean_batch_completes_with_an_output_file(provider: BatchesService, files: FakeFiles) -> None:
    batch = await run_batch(provider, files, [chat_line(f"r{i}", f"q{i}") for i in range(10)])
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 10, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.error_file_id is None
    lines = read_lines(files, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(10)]
    assert all(isinstance(line["response"]["body"], dict) for line in lines)
    assert "q3" in lines[3]["response"]["body"]["echo"]
    assert files.names[batch.output_file_id] == f"{batch.id}_output.jsonl"


async def test_backend_errors_go_to_the_error_file(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    def refuse_marked(body: dict[str, Any]) -> None:
        if "refuse" in str(body["messages"]):
            response = httpx.Response(400, request=httpx.Request("POST", "http://model"))
            raise openai.BadRequestError("no", response=response, body={"error": {"message": "refused", "code": "x"}})

    inference.behaviour = refuse_marked
    batch = await run_batch(provider, files, [chat_line("ok"), chat_line("bad", "refuse")])
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [error] = read_lines(files, batch.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] == "refused"


async def test_all_failed_still_completes_without_output_file(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    def crash(_: dict[str, Any]) -> None:
        raise ConnectionError("backend down")

    inference.behaviour = crash
    batch = await run_batch(provider, files, [chat_line("a"), chat_line("b")])
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert [line["error"]["code"] for line in read_lines(files, batch.error_file_id)] == ["connection_error"] * 2


async def test_missing_input_file_fails_validation(provider: BatchesService) -> None:
    batch = await provider.create_batch(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    await provider._runner.wait_idle()
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "failed"
    assert batch.failed_at is not None
    [error] = batch.errors.data
    assert (error.code, error.param) == ("invalid_request", "input_file_id")
    assert error.message == "Cannot find file 'file-missing', or you do not have access to it."  # OpenAI's words


async def test_invalid_lines_fail_the_batch_and_run_nothing(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    bad = chat_line("b")
    bad["url"] = "/v1/embeddings"
    batch = await run_batch(provider, files, [chat_line("a"), bad])
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_url", 2)]
    assert inference.calls == []


async def test_unknown_models_are_looked_up_once_each(
    provider: BatchesService, files: FakeFiles, models: FakeModels
) -> None:
    lines = [chat_line(f"r{i}", model="local/ghost" if i % 2 else "local/m-chat") for i in range(20)]
    batch = await run_batch(provider, files, lines)
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("model_not_found", 2, "body.model")]
    assert batch.errors.data[0].message == "The provided model 'local/ghost' is not supported by the Batch API."
    assert sorted(models.lookups) == ["local/ghost", "local/m-chat"]


async def test_a_model_named_without_its_provider_prefix_gets_a_hint(
    provider: BatchesService, files: FakeFiles
) -> None:
    batch = await run_batch(provider, files, [chat_line("a"), chat_line("b", model="m-chat")])
    assert [(e.code, e.line) for e in batch.errors.data] == [("model_not_found", 2)]
    message = batch.errors.data[0].message
    assert message.startswith("The provided model 'm-chat' is not supported by the Batch API.")
    assert "'<provider_id>/<model>'" in message and "Did you mean 'local/m-chat'?" in message


async def test_the_window_is_sliding_not_lock_step(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    # One slow request must not hold back the others: with a window of 4, the 19 fast ones
    # all finish while the slow one is still running.
    release = hold_requests(inference, mentioning="slow")
    lines = [chat_line("slow", "slow"), *(chat_line(f"f{i}") for i in range(19))]
    batch = await create_chat_batch(provider, files, lines)
    for _ in range(200):
        if len(inference.calls) == 20 and inference.in_flight == 1:
            break
        await asyncio.sleep(0.01)
    assert len(inference.calls) == 20
    assert inference.in_flight == 1  # only the slow one
    release.set()
    await provider._runner.wait_idle()
    assert (await provider.retrieve_batch(batch.id)).status == "completed"
    assert inference.max_in_flight == 4


async def test_cancel_mid_run_keeps_partial_results(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    gate = asyncio.Event()

    async def wait_after_ten(_: dict[str, Any]) -> None:
        if len(inference.calls) > 10:
            await gate.wait()

    inference.behaviour = wait_after_ten
    batch = await start_batch(provider, files, 100)
    while len(inference.calls) < 14:
        await asyncio.sleep(0.01)
    cancelling = await provider.cancel_batch(batch.id)
    assert cancelling.status == "cancelling"
    gate.set()
    await provider._runner.wait_idle()
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "cancelled"
    assert batch.cancelled_at is not None
    assert len(inference.calls) == 14  # nothing dispatched after the cancel
    output = read_lines(files, batch.output_file_id)
    assert len(output) == 14 == batch.request_counts.completed
    assert batch.request_counts.total == 100


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/embeddings"])
async def test_other_endpoints_run(provider: BatchesService, files: FakeFiles, endpoint: str) -> None:
    field = {"/v1/completions": "prompt", "/v1/embeddings": "input"}[endpoint]
    lines = [{"custom_id": "x", "method": "POST", "url": endpoint, "body": {"model": "local/m-embed", field: "t"}}]
    file_id = files.add(jsonl(lines))
    batch = await provider.create_batch(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    await provider._runner.wait_idle()
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "completed"
    assert read_lines(files, batch.output_file_id)[0]["custom_id"] == "x"


async def test_usage_and_model_are_filled(provider: BatchesService, files: FakeFiles) -> None:
    batch = await run_batch(provider, files, [chat_line(f"r{i}") for i in range(4)])
    assert batch.model == "local/m-chat"
    assert (batch.usage.input_tokens, batch.usage.output_tokens, batch.usage.total_tokens) == (12, 8, 20)


async def test_counts_move_while_the_batch_runs(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    async def slow(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)

    inference.behaviour = slow
    batch = await start_batch(provider, files, 80)  # about 1 s at a window of 4
    seen: set[int] = set()
    while (current := await provider.retrieve_batch(batch.id)).status not in ("completed", "failed"):
        seen.add(current.request_counts.completed)
        await asyncio.sleep(0.05)
    assert len(seen - {0, 80}) >= 1  # at least one count strictly between start and end was visible


async def test_results_are_stored_as_they_finish_and_dropped_at_the_end(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    gate = hold_requests(inference, mentioning="last")
    batch = await create_chat_batch(provider, files, [*(chat_line(f"r{i}") for i in range(9)), chat_line("z", "last")])
    for _ in range(100):
        if (await provider.retrieve_batch(batch.id)).request_counts.completed == 9:
            break
        await asyncio.sleep(0.05)
    chunks = [chunk async for chunk in provider._store.results.read(batch.id)]
    assert sum(len(decode_results(chunk)) for chunk in chunks) == 9  # durable while the batch still runs
    gate.set()
    await provider._runner.wait_idle()
    assert [chunk async for chunk in provider._store.results.read(batch.id)] == []


async def test_expiry_writes_partial_output_and_expired_lines(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    inference.stall_after(3, seconds=30)
    provider = await make_provider(
        completion_window_seconds=2,  # created_at is whole seconds: at least 1 s of window
        cancel_grace_seconds=0.1,
        max_concurrent_requests_per_batch=1,
    )
    batch = await run_batch(provider, files, [chat_line(f"r{i}") for i in range(10)])
    assert batch.status == "expired"
    assert batch.expired_at is not None
    assert [line["custom_id"] for line in read_lines(files, batch.output_file_id)] == ["r0", "r1", "r2"]
    errors = read_lines(files, batch.error_file_id)
    assert [line["custom_id"] for line in errors] == [f"r{i}" for i in range(3, 10)]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 7)
    await provider.shutdown()


async def test_cancel_abandons_stuck_requests_after_the_grace_period(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    inference.stall_after(2)
    provider = await make_provider(cancel_grace_seconds=0.2)
    batch = await start_batch(provider, files, 10)
    while len(inference.calls) < 6:
        await asyncio.sleep(0.01)
    await provider.cancel_batch(batch.id)
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=5)
    batch = await provider.retrieve_batch(batch.id)
    assert batch.status == "cancelled"
    assert len(read_lines(files, batch.output_file_id)) == 2
    await provider.shutdown()


async def test_a_resumed_job_skips_requests_whose_results_are_stored(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    inference.stall_after(5)
    first = await make_provider(max_concurrent_requests_per_batch=2)
    batch = await start_batch(first, files, 20)
    await wait_until_completed(first, batch.id, 5)
    await first.shutdown()  # as a server stop: the batch stays in_progress
    assert (await first.retrieve_batch(batch.id)).status == "in_progress"

    inference.behaviour = None
    calls_before = len(inference.calls)
    second = await restarted(make_provider)
    batch = await second.retrieve_batch(batch.id)
    assert batch.status == "completed"
    assert len(inference.calls) - calls_before == 15
    output = read_lines(files, batch.output_file_id)
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(20)]
    await second.shutdown()


async def test_a_request_whose_result_is_stored_twice_counts_once(
    make_replica: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when a process that lost a shard's lease stored a result late: the same request in two epochs.
    provider = await make_replica()
    monkeypatch.setattr(provider._runner, "start", lambda: None)
    batch = await start_batch(provider, files, 6)
    store = provider._store
    usage = '{"usage": {"prompt_tokens": 3, "completion_tokens": 2}, "epoch": %d}'
    await store.results.save(
        batch.id, 0, 1, 0, [ResultEntry(p, True, success_line(f"r{p}", usage % 1)) for p in (0, 1)]
    )
    await store.results.save(
        batch.id, 0, 2, 0, [ResultEntry(p, True, success_line(f"r{p}", usage % 2)) for p in (1, 2)]
    )
    monkeypatch.undo()
    provider.start()
    await provider._runner.wait_idle()
    final = await provider.retrieve_batch(batch.id)
    output = read_lines(files, final.output_file_id)
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(6)]
    assert output[1]["response"]["body"]["epoch"] == 1  # the first stored result
    assert len(inference.calls) == 3  # r3 to r5
    assert (final.request_counts.completed, final.usage.input_tokens) == (6, 18)
    assert [chunk async for chunk in store.results.read(batch.id)] == []
    await provider.shutdown()


# --- deadlines, gone inputs and unwritable answers ----------------------------------------------


async def stopped_half_way(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> tuple[str, str]:
    """A 20-request batch stopped by a server stop after 5 results; return (batch id, input file id)."""
    inference.stall_after(5)
    first = await make_provider(shutdown_grace_seconds=0.05)
    batch = await start_batch(first, files, 20)
    await wait_until_completed(first, batch.id, 5)
    await first.shutdown()
    inference.behaviour = None
    return batch.id, batch.input_file_id


async def test_a_batch_resumed_after_its_deadline_sends_nothing_and_expires(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    batch_id, _ = await stopped_half_way(make_provider, files, inference)
    calls_before = len(inference.calls)
    second = await make_provider()
    second._runner._clock = lambda: time.time() + 2 * 86400  # the server was down past expires_at
    second.start()
    await second._runner.wait_idle()
    batch = await second.retrieve_batch(batch_id)
    assert batch.status == "expired"
    assert len(inference.calls) == calls_before
    errors = read_lines(files, batch.error_file_id)
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert batch.request_counts.completed + batch.request_counts.failed == batch.request_counts.total == 20
    assert sorted(line["custom_id"] for line in errors + read_lines(files, batch.output_file_id)) == sorted(
        f"r{i}" for i in range(20)
    )
    await second.shutdown()


async def test_a_batch_that_reaches_its_slot_after_its_deadline_expires_unrun(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(max_concurrent_batches=1)
    _, gate = await occupy_the_only_slot(provider, files, inference)
    late = await create_chat_batch(provider, files, [chat_line("late", "late question")])
    provider._runner._clock = lambda: time.time() + 2 * 86400
    gate.set()
    await provider._runner.wait_idle()
    expired = await provider.retrieve_batch(late.id)
    assert expired.status == "expired" and expired.in_progress_at is None
    assert expired.request_counts.total == 0
    assert not any("late question" in str(call["messages"]) for call in inference.calls)
    await provider.shutdown()


async def test_a_batch_whose_input_is_deleted_accounts_for_every_request(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    batch_id, file_id = await stopped_half_way(make_provider, files, inference)
    del files.contents[file_id]
    second = await restarted(make_provider)
    batch = await second.retrieve_batch(batch_id)
    assert batch.status == "failed"
    assert [error.code for error in batch.errors.data] == ["input_file_unavailable"]
    output, errors = read_lines(files, batch.output_file_id), read_lines(files, batch.error_file_id)
    assert {line["error"]["code"] for line in errors} == {"input_file_unavailable"}
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"r{i}" for i in range(20))
    counts = batch.request_counts
    assert (counts.completed, counts.failed, counts.total) == (len(output), len(errors), 20)
    await second.shutdown()


async def test_a_cancelled_batch_ends_without_reading_its_input_again(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    batch_id, file_id = await stopped_half_way(make_provider, files, inference)
    second = await make_provider()
    await second.cancel_batch(batch_id)
    files.contents[file_id] = b"[" * 5_000  # whatever the file holds now, it is not read again
    reads_before = len(files.readers)
    second.start()
    await second._runner.wait_idle()
    batch = await second.retrieve_batch(batch_id)
    assert batch.status == "cancelled" and batch.request_counts.completed >= 5
    assert len(files.readers) == reads_before
    await second.shutdown()


async def test_an_answer_that_cannot_be_written_is_that_requests_error(
    provider: BatchesService, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.conftest import FakeResponse

    real = inference.openai_chat_completion

    async def answer(params: Any) -> Any:
        if "broken" in str(params.messages):
            return FakeResponse(text="\ud800 lone surrogate")
        return await real(params)

    monkeypatch.setattr(inference, "openai_chat_completion", answer)
    batch = await run_batch(provider, files, [chat_line("ok"), chat_line("bad", "broken")])
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [error] = read_lines(files, batch.error_file_id)
    assert (error["custom_id"], error["error"]["code"]) == ("bad", "invalid_response")


# --- stops while the last requests are in flight -------------------------------------------------


async def two_slow_requests_in_flight(provider: BatchesService, files: FakeFiles, inference: FakeInference) -> str:
    """Start a 2-request batch (fewer than the window, so all of it is in flight) of 0.3 s requests."""

    async def slow(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.3)

    inference.behaviour = slow
    batch = await start_batch(provider, files, 2)
    while len(inference.calls) < 2:
        await asyncio.sleep(0.005)
    return batch.id


async def test_requests_in_flight_at_a_cancel_get_their_grace_period(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(cancel_grace_seconds=5)
    batch_id = await two_slow_requests_in_flight(provider, files, inference)
    await provider.cancel_batch(batch_id)
    await asyncio.wait_for(provider._runner.wait_idle(), 5)
    final = await provider.retrieve_batch(batch_id)
    assert final.status == "cancelled" and final.request_counts.completed == 2
    await provider.shutdown()


async def test_requests_in_flight_at_a_server_stop_are_stored_not_repeated(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(shutdown_grace_seconds=3)
    batch_id = await two_slow_requests_in_flight(provider, files, inference)
    await provider.shutdown()
    stopped = await provider._store.get(batch_id)
    assert stopped.batch.status == "in_progress"  # a stop is not an expiry
    assert stopped.batch.request_counts.completed == 2


async def test_a_cancel_before_dispatching_sends_nothing(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider()
    results = provider._store.results
    real_read = results.read
    loading = asyncio.Event()

    async def slow_read(batch_id: str, shard: int | None = None) -> Any:
        # Stored results are read after the move to in_progress and before the first request goes out.
        loading.set()
        await asyncio.sleep(0.1)
        async for chunk in real_read(batch_id, shard):
            yield chunk

    results.read = slow_read  # type: ignore[method-assign]
    batch = await start_batch(provider, files, 10)
    await loading.wait()
    await provider.cancel_batch(batch.id)
    await asyncio.wait_for(provider._runner.wait_idle(), 5)
    assert (await provider.retrieve_batch(batch.id)).status == "cancelled"
    assert inference.calls == []
    await provider.shutdown()


async def test_a_cancel_while_an_invalid_file_is_checked_is_no_processing_failure(
    make_provider: ProviderFactory, files: FakeFiles
) -> None:
    provider = await make_provider()
    real = files.openai_retrieve_file_content
    reading = asyncio.Event()

    async def slow_read(request: Any) -> Any:
        reading.set()
        await asyncio.sleep(0.2)
        return await real(request)

    files.openai_retrieve_file_content = slow_read  # type: ignore[method-assign]
    batch = await provider.create_batch(input_file_id=files.add(b"not json\n"), endpoint=CHAT, completion_window="24h")
    await reading.wait()
    await provider.cancel_batch(batch.id)
    await asyncio.wait_for(provider._runner.wait_idle(), 5)
    stored = await provider._store.get(batch.id)
    assert stored.batch.status == "cancelled" and stored.processing_failures == 0
    await provider.shutdown()


async def test_nothing_waiting_for_the_traffic_budget_is_sent_after_the_deadline(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(completion_window_seconds=1, max_in_flight_requests=1)
    sent_at: list[float] = []

    async def first_one_slow(_: dict[str, Any]) -> None:
        sent_at.append(time.time())
        if len(sent_at) == 1:
            await asyncio.sleep(1.5)  # past the deadline, while the others wait for the budget

    inference.behaviour = first_one_slow
    # Batch times are whole seconds: created just after one begins, the batch has almost all of its
    # second to pass validation and send the first request (created late in one, it may expire unrun).
    await asyncio.sleep(1.02 - time.time() % 1)
    batch = await start_batch(provider, files, 4)
    await asyncio.wait_for(provider._runner.wait_idle(), 10)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "expired"
    assert [t for t in sent_at if t >= final.expires_at] == []
    errors = read_lines(files, final.error_file_id)
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert final.request_counts.completed + final.request_counts.failed == 4
    await provider.shutdown()


async def test_the_next_shard_runs_beside_the_last_requests_of_the_one_before(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference
) -> None:
    provider = await make_provider(requests_per_shard=5, max_concurrent_requests_per_batch=10)

    async def takes_a_while(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)

    inference.behaviour = takes_a_while
    batch = await run_batch(provider, files, [chat_line(f"r{n}", f"question {n}") for n in range(40)])
    assert batch.status == "completed" and batch.request_counts.completed == 40
    # A shard holds 5 requests: more in flight at once means two shards ran side by side, and
    # never more than the batch's window of 10.
    assert 5 < inference.max_in_flight <= 10
    lines = read_lines(files, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{n}" for n in range(40))
    await provider.shutdown()


async def test_a_store_that_hangs_bounds_what_is_sent_across_two_shard_runs_side_by_side(
    make_provider: ProviderFactory, files: FakeFiles, inference: FakeInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A partition: result writes neither fail nor return. What was sent and is not stored is what
    # would run again elsewhere; it stays within two windows (20) when the first shard of 15 has sent
    # everything and the next runs beside it.
    provider = await make_provider(requests_per_shard=15, max_concurrent_requests_per_batch=10)
    heal = asyncio.Event()
    real_save = provider._store.results.save

    async def hangs(*args: Any, **kwargs: Any) -> None:
        await heal.wait()
        await real_save(*args, **kwargs)

    async def takes_a_while(_: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)

    inference.behaviour = takes_a_while
    monkeypatch.setattr(provider._store.results, "save", hangs)
    batch = await create_chat_batch(provider, files, [chat_line(f"r{n}", f"question {n}") for n in range(60)])
    async with asyncio.timeout(10):
        while len(inference.calls) < 20:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # time enough for a 21st, were the bound not kept
    assert len(inference.calls) == 20  # the whole bound is used, and not one request more
    heal.set()
    await asyncio.wait_for(provider._runner.wait_idle(), timeout=20)
    final = await provider.retrieve_batch(batch.id)
    assert final.status == "completed" and final.request_counts.completed == 60
    await provider.shutdown()
