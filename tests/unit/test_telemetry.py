"""The provider's metrics and spans, read with the OpenTelemetry SDK's in-memory reader and exporter.

The SDK's providers can be set once per process; the counters are cumulative over the test session,
so each test compares what it reads before and after its batch."""

import asyncio
from typing import Any

import httpx
import openai
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llama_stack_provider_batches import BatchesProviderConfig, BatchesService, telemetry
from llama_stack_provider_batches.domain.records import StoredBatch
from llama_stack_provider_batches.engine import runner
from llama_stack_provider_batches.engine.housekeeping import Housekeeper
from llama_stack_provider_batches.storage.sql_store import SQLBatchStore
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels, provider_with
from tests.unit.helpers import chat_line, create_chat_batch, make_batch, run_batch
from tools.tiktoken_cache import ensure_cache

READER = InMemoryMetricReader()
SPANS = InMemorySpanExporter()
metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_tracer_provider)

Points = dict[tuple[str, frozenset[tuple[str, Any]]], float]


def points() -> Points:
    """Every data point now: (metric, attributes) -> value (a histogram's count)."""
    found: Points = {}
    data = READER.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "count", None) if hasattr(point, "bucket_counts") else point.value
                    found[(metric.name, frozenset(point.attributes.items()))] = value
    return found


def delta(before: Points, after: Points, name: str, **attributes: Any) -> float:
    key = (telemetry.PREFIX + name, frozenset(attributes.items()))
    return after.get(key, 0) - before.get(key, 0)


def unavailable() -> openai.APIStatusError:
    response = httpx.Response(503, request=httpx.Request("POST", "http://backend"))
    return openai.APIStatusError("busy", response=response, body=None)


async def test_a_batch_is_counted_from_create_to_its_end(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    failed_once: set[str] = set()

    def script(body: dict[str, Any]) -> None:
        content = body["messages"][0]["content"]
        if content == "flaky" and content not in failed_once:
            failed_once.add(content)
            raise unavailable()
        if content == "refused":
            raise openai.BadRequestError(
                "no", response=httpx.Response(400, request=httpx.Request("POST", "http://b")), body=None
            )

    inference.behaviour = script
    before = points()
    lines = [chat_line("a", "fine"), chat_line("b", "flaky"), chat_line("c", "refused")]
    batch = await run_batch(provider, files, lines)
    assert batch.status == "completed"
    after = points()
    chat, model = "/v1/chat/completions", "local/m-chat"
    assert delta(before, after, "created_total", endpoint=chat) == 1
    assert delta(before, after, "finished_total", endpoint=chat, status="completed") == 1
    assert delta(before, after, "requests_total", endpoint=chat, model=model, outcome="succeeded") == 2
    assert delta(before, after, "requests_total", endpoint=chat, model=model, outcome="http_400") == 1
    assert delta(before, after, "retries_total", endpoint=chat, model=model, cause="http_503") == 1
    # Every attempt is timed: 2 + 1 successes and failures (the retried 503, the 400).
    assert delta(before, after, "request_duration_seconds", endpoint=chat, model=model, outcome="succeeded") == 2
    assert delta(before, after, "request_duration_seconds", endpoint=chat, model=model, outcome="http_503") == 1
    assert delta(before, after, "queue_wait_seconds", endpoint=chat) == 1
    assert delta(before, after, "result_commit_seconds") >= 1
    assert not any(key == "batch_id" for _, attributes in after for key, _ in attributes), "no batch ids in metrics"


async def test_a_refused_file_ends_failed_and_unfinished_batches_are_gauged(
    provider: BatchesService, files: FakeFiles, inference: FakeInference
) -> None:
    before = points()
    batch = await run_batch(provider, files, [chat_line("a", model="local/ghost")])
    assert batch.status == "failed"
    after = points()
    assert delta(before, after, "finished_total", endpoint="/v1/chat/completions", status="failed") == 1
    gate = asyncio.Event()

    async def hold(_: dict[str, Any]) -> None:
        await gate.wait()

    inference.behaviour = hold
    waiting = await provider.create_batch(
        input_file_id=files.add(
            b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "local/m-chat", "messages": []}}'
        ),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    while (await provider.retrieve_batch(waiting.id)).status != "in_progress":
        await asyncio.sleep(0.01)
    telemetry.set_status_counts(await provider._store.unfinished_by_status())
    gauge = points()
    assert gauge[(telemetry.PREFIX + "batches", frozenset({("status", "in_progress")}))] == 1
    assert gauge[(telemetry.PREFIX + "batches", frozenset({("status", "validating")}))] == 0
    gate.set()


async def test_a_batch_job_and_its_requests_are_spans(provider: BatchesService, files: FakeFiles) -> None:
    SPANS.clear()
    batch = await run_batch(provider, files, [chat_line("a"), chat_line("b")])
    spans = SPANS.get_finished_spans()
    jobs = [s for s in spans if s.name == "batches.job"]
    requests = [s for s in spans if s.name == "batches.request"]
    assert [s.attributes["batch_id"] for s in jobs] == [batch.id]
    assert len(requests) == 2
    assert all(s.context.trace_id == jobs[0].context.trace_id for s in requests), "requests inside their job"


async def test_the_engine_refreshes_the_gauge_of_unfinished_batches(provider: BatchesService) -> None:
    telemetry.set_status_counts({})
    provider.start()  # its first look for work refreshes the gauge
    for _ in range(200):
        if (telemetry.PREFIX + "batches", frozenset({("status", "validating")})) in points():
            break
        await asyncio.sleep(0.01)
    gauge = {
        dict(attributes)["status"]: value
        for (name, attributes), value in points().items()
        if name == telemetry.PREFIX + "batches"
    }
    assert gauge == {"validating": 0, "in_progress": 0, "finalizing": 0, "cancelling": 0}


def test_outcomes_are_few_valued() -> None:
    assert telemetry.outcome_of(None) == "succeeded"
    assert telemetry.outcome_of(unavailable()) == "http_503"
    assert telemetry.outcome_of(TimeoutError()) == "timeout"
    assert telemetry.outcome_of(ConnectionResetError()) == "connection_error"
    assert telemetry.outcome_of(RuntimeError("x")) == "error"


async def test_the_engine_gauges_enqueued_tokens_by_model_until_the_batch_ends(
    config: BatchesProviderConfig,
    files: FakeFiles,
    inference: FakeInference,
    models: FakeModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(ensure_cache()))
    monkeypatch.setattr(runner, "SWEEP_PASSES", 1)  # every look for work refreshes the gauges
    telemetry.set_enqueued_tokens({"local/gone": 5})
    gate = asyncio.Event()

    async def hold(_: dict[str, Any]) -> None:
        await gate.wait()

    inference.behaviour = hold
    provider = await provider_with(config, files, inference, models, max_enqueued_tokens_per_user=10_000)
    provider.start()
    key = (telemetry.PREFIX + "enqueued_tokens", frozenset({("model", "local/m-chat")}))
    try:
        batch = await create_chat_batch(provider, files, [chat_line(f"r{i}") for i in range(4)])
        # The tokens count from the admission on; the batch shows its estimate once it is in progress.
        async with asyncio.timeout(10):
            while not points().get(key) or (running := await provider.retrieve_batch(batch.id)).status != "in_progress":
                await asyncio.sleep(0.01)
        assert points()[key] == running.model_extra["estimated_input_tokens"] > 0
        assert points()[(telemetry.PREFIX + "enqueued_tokens", frozenset({("model", "local/gone")}))] == 0
        gate.set()
        async with asyncio.timeout(10):
            while points()[key]:
                await asyncio.sleep(0.01)
    finally:
        gate.set()
        await provider.shutdown()


def test_webhook_deliveries_are_counted_by_event_type_and_outcome() -> None:
    before = points()
    telemetry.webhook_delivered("batch.completed", "retried", None)
    telemetry.webhook_delivered("batch.completed", "delivered", 1.5)
    telemetry.webhook_delivered("batch.failed", "dropped", None)
    telemetry.set_webhook_pending(7)
    after = points()
    for event_type, outcome in (("batch.completed", "retried"), ("batch.completed", "delivered")):
        assert delta(before, after, "webhook_deliveries_total", event_type=event_type, outcome=outcome) == 1
    assert delta(before, after, "webhook_deliveries_total", event_type="batch.failed", outcome="dropped") == 1
    # Latency is that of a delivery: from the event to the receiver's 2xx.
    assert delta(before, after, "webhook_latency_seconds", event_type="batch.completed") == 1
    assert delta(before, after, "webhook_latency_seconds", event_type="batch.failed") == 0
    assert after[(telemetry.PREFIX + "webhook_pending", frozenset())] == 7


async def test_a_sweep_counts_the_rows_bytes_and_files_it_removed(
    store: SQLBatchStore, config: BatchesProviderConfig
) -> None:
    class Files:
        async def openai_delete_file(self, request: Any) -> None:
            pass

    await store.retention.expire_file_at("file-1", "batch_1", None, 10.0)
    await store.shards.create(make_batch("batch_done", status="in_progress"), [(0, 1)], 1, shareable=True)
    await store.request_ids.save("batch_done", ["a"])
    await store.create(StoredBatch(batch=make_batch("batch_done", status="failed", output_file_id="file-1")))
    before = points()
    removed = await Housekeeper(store.retention, Files(), config, clock=lambda: 100.0).sweep()
    after = points()
    assert (removed.rows, removed.bytes) == (2, len('["a"]'))  # the shard row and custom_id chunk left behind
    assert delta(before, after, "swept_rows_total") == 2
    assert delta(before, after, "swept_bytes_total") == 5
    assert delta(before, after, "expired_files_total") == 1
