"""What the provider reports to OpenTelemetry, next to the stack's own metrics: its instruments, and the
few functions the rest of the code calls to record into them.

The stack sets up the meter provider itself when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over
HTTP, every `OTEL_METRIC_EXPORT_INTERVAL` ms); run under `opentelemetry-instrument` it exports spans
as well. Without either, the instruments and spans here are no-ops. Metric attributes stay few-valued
(endpoint, model, status, outcome, cause): never a batch id, which only spans carry.

    llama_stack.batches.batches                  gauge      batches by status (the whole store's)
    llama_stack.batches.created_total            counter    batches created, by endpoint
    llama_stack.batches.finished_total           counter    batches that ended, by endpoint and status
    llama_stack.batches.requests_total           counter    requests that ended, by endpoint, model, outcome
    llama_stack.batches.retries_total            counter    attempts retried, by endpoint, model, cause
    llama_stack.batches.request_duration_seconds histogram  one attempt, by endpoint, model, outcome
    llama_stack.batches.queue_wait_seconds       histogram  from create to the start of its job, by endpoint
    llama_stack.batches.result_commit_seconds    histogram  storing one group of results
    llama_stack.batches.enqueued_tokens          gauge      estimated input tokens waiting, by model (the whole
                                                            store's; with max_enqueued_tokens_per_user set)
    llama_stack.batches.webhook_deliveries_total counter    delivery attempts, by event type and outcome
                                                            (delivered, retried, dropped)
    llama_stack.batches.webhook_latency_seconds  histogram  from an event to its delivery, by event type
    llama_stack.batches.webhook_pending          gauge      deliveries still to make (the whole store's)
    llama_stack.batches.swept_rows_total         counter    rows the retention sweep removed
    llama_stack.batches.swept_bytes_total        counter    bytes of records and chunks it removed
    llama_stack.batches.expired_files_total      counter    result files deleted at their expiry
"""

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx
import openai
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span

from .domain.errors import status_code_of
from .domain.lifecycle import is_terminal
from .stack import BatchObject

PREFIX = "llama_stack.batches."
_meter = metrics.get_meter("llama_stack_provider_batches")
_tracer = trace.get_tracer("llama_stack_provider_batches")

_created = _meter.create_counter(PREFIX + "created_total", unit="1", description="Batches created")
_finished = _meter.create_counter(PREFIX + "finished_total", unit="1", description="Batches that ended, by status")
_requests = _meter.create_counter(PREFIX + "requests_total", unit="1", description="Batch requests that ended")
_retries = _meter.create_counter(PREFIX + "retries_total", unit="1", description="Batch request attempts retried")
# Seconds, not the SDK's default buckets (0 to 10,000, made for milliseconds).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
_request_duration = _meter.create_histogram(
    PREFIX + "request_duration_seconds",
    unit="s",
    description="Duration of one attempt of a batch request",
    explicit_bucket_boundaries_advisory=REQUEST_BUCKETS,
)
_queue_wait = _meter.create_histogram(
    PREFIX + "queue_wait_seconds",
    unit="s",
    description="Time from a batch's create to the start of its job",
    explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
)
_commit_duration = _meter.create_histogram(
    PREFIX + "result_commit_seconds",
    unit="s",
    description="Time to store one group of finished results",
    explicit_bucket_boundaries_advisory=COMMIT_BUCKETS,
)

_webhook_deliveries = _meter.create_counter(
    PREFIX + "webhook_deliveries_total", unit="1", description="Webhook delivery attempts, by outcome"
)
_webhook_latency = _meter.create_histogram(
    PREFIX + "webhook_latency_seconds",
    unit="s",
    description="Time from a batch's end to its event's delivery",
    explicit_bucket_boundaries_advisory=REQUEST_BUCKETS,
)
_webhook_pending: list[int] = [0]
_meter.create_observable_gauge(
    PREFIX + "webhook_pending",
    callbacks=[lambda _: [Observation(_webhook_pending[0])]],
    unit="1",
    description="Webhook deliveries still to make",
)

_swept_rows = _meter.create_counter(PREFIX + "swept_rows_total", unit="1", description="Rows the sweep removed")
_swept_bytes = _meter.create_counter(PREFIX + "swept_bytes_total", unit="By", description="Bytes the sweep removed")
_expired_files = _meter.create_counter(
    PREFIX + "expired_files_total", unit="1", description="Result files deleted at their expiry"
)

# The latest count of batches by status, refreshed by the engine (a store query): the gauge's callback
# runs on the exporter's thread, where the store cannot be asked.
_status_counts: dict[str, int] = {}


def _observe_statuses(_: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {"status": status}) for status, count in list(_status_counts.items())]


_meter.create_observable_gauge(
    PREFIX + "batches", callbacks=[_observe_statuses], unit="1", description="Batches by status"
)


_enqueued_tokens: dict[str, int] = {}


def _observe_enqueued_tokens(_: CallbackOptions) -> Iterable[Observation]:
    return [Observation(tokens, {"model": model}) for model, tokens in list(_enqueued_tokens.items())]


_meter.create_observable_gauge(
    PREFIX + "enqueued_tokens",
    callbacks=[_observe_enqueued_tokens],
    unit="{token}",
    description="Estimated input tokens of requests waiting in unfinished batches, by model",
)


def set_enqueued_tokens(by_model: Mapping[str, int]) -> None:
    """Replace the counts the `enqueued_tokens` gauge reports; a model missing now reports 0."""
    _enqueued_tokens.update(dict.fromkeys(_enqueued_tokens, 0))
    _enqueued_tokens.update(by_model)


def set_status_counts(counts: Mapping[str, int]) -> None:
    """Replace the counts the `batches` gauge reports."""
    _status_counts.clear()
    _status_counts.update(counts)


def batch_created(endpoint: str) -> None:
    _created.add(1, {"endpoint": endpoint})


def batch_moved(before: BatchObject, after: BatchObject) -> None:
    """Record a committed status change that ends a batch."""
    if is_terminal(after.status) and not is_terminal(before.status):
        _finished.add(1, {"endpoint": after.endpoint, "status": after.status})


def job_started(batch: BatchObject, now: float) -> None:
    """Record how long a batch waited for its job: from its create to its first claim (before validation)."""
    _queue_wait.record(max(0.0, now - batch.created_at), {"endpoint": batch.endpoint})


def attempt_ended(endpoint: str, model: str, outcome: str, seconds: float) -> None:
    _request_duration.record(seconds, {"endpoint": endpoint, "model": model, "outcome": outcome})


def retried(endpoint: str, model: str, cause: str) -> None:
    _retries.add(1, {"endpoint": endpoint, "model": model, "cause": cause})


def request_ended(endpoint: str, model: str, outcome: str) -> None:
    _requests.add(1, {"endpoint": endpoint, "model": model, "outcome": outcome})


def results_committed(seconds: float) -> None:
    _commit_duration.record(seconds)


def webhook_delivered(event_type: str, outcome: str, latency_seconds: float | None) -> None:
    """Record one delivery attempt: `delivered`, `retried` or `dropped` (past its retry period)."""
    _webhook_deliveries.add(1, {"event_type": event_type, "outcome": outcome})
    if latency_seconds is not None:
        _webhook_latency.record(max(0.0, latency_seconds), {"event_type": event_type})


def set_webhook_pending(count: int) -> None:
    _webhook_pending[0] = count


def swept(rows: int, size: int, files: int) -> None:
    """Record one sweep: rows and bytes removed from the store, result files deleted."""
    _swept_rows.add(rows)
    _swept_bytes.add(size)
    _expired_files.add(files)


def outcome_of(exc: BaseException | None) -> str:
    """A failure's kind, in few values: `succeeded`, `http_<status>`, `timeout`, `connection_error` or `error`."""
    if exc is None:
        return "succeeded"
    status = status_code_of(exc)
    if status is not None and 100 <= status < 600:
        return f"http_{status}"
    if isinstance(exc, TimeoutError | openai.APITimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, ConnectionError | openai.APIConnectionError | httpx.TransportError):
        return "connection_error"
    return "error"


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span]:
    """A span around some work (a batch's job, one request), with its attributes; a no-op without a tracer."""
    with _tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None}) as s:
        yield s
