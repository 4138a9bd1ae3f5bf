"""Metrics and spans exported by a real stack, the way an operator receives them: `opentelemetry-instrument
llama stack run` exporting OTLP over HTTP to a receiver this test runs (in place of a collector)."""

import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.batching import chat_lines, create_chat_batch, wait_for_batch
from tools.harness import OTEL_INSTRUMENT, ServerProcess, start_stack, warm_up

PREFIX = "llama_stack.batches."


class Receiver:
    """An OTLP/HTTP endpoint keeping the latest value of every metric point, and every span."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, frozenset[tuple[str, Any]]], float] = {}
        self.spans: list[Any] = []
        self.lock = threading.Lock()

    def take(self, path: str, body: bytes) -> None:
        if path.endswith("/v1/metrics"):
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            with self.lock:
                for resource in request.resource_metrics:
                    for scope in resource.scope_metrics:
                        for metric in scope.metrics:
                            self._take_metric(metric)
        elif path.endswith("/v1/traces"):
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            with self.lock:
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        self.spans.extend(scope.spans)

    def _take_metric(self, metric: Any) -> None:
        kind = metric.WhichOneof("data")
        for point in getattr(metric, kind).data_points:
            attributes = frozenset((a.key, getattr(a.value, a.value.WhichOneof("value"))) for a in point.attributes)
            value = point.count if kind == "histogram" else getattr(point, point.WhichOneof("value"))
            self.points[(metric.name, attributes)] = value  # cumulative: the latest export holds the total

    def value(self, name: str, **attributes: Any) -> float:
        with self.lock:
            return self.points.get((PREFIX + name, frozenset(attributes.items())), 0)

    def inference_requests(self, model: str) -> float:
        """Requests the stack's own inference-duration histogram counted for `model` (any provider, status)."""
        with self.lock:
            return sum(
                count
                for (name, attributes), count in self.points.items()
                if name.endswith(".inference.duration_seconds") and ("model", model) in attributes
            )

    def names(self) -> set[str]:
        with self.lock:
            return {name for name, _ in self.points}


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            received.take(self.path, body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield received, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def instrumented_stack(
    run_dir: Path, standin_server: ServerProcess, receiver: tuple[Receiver, str]
) -> Iterator[ServerProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver[1],
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "batches-test",
    }
    launcher = (str(OTEL_INSTRUMENT),)
    server = start_stack(run_dir, run_dir / "otel-state", f"{standin_server.url}/v1", env, launcher=launcher)
    warm_up(server)
    yield server
    server.stop()


def eventually(check: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not seen in time")
        time.sleep(0.1)


def test_a_batch_is_seen_in_the_exported_metrics_and_spans(
    instrumented_stack: ServerProcess, receiver: tuple[Receiver, str], run_dir: Path
) -> None:
    received, _ = receiver
    client = OpenAI(base_url=f"{instrumented_stack.url}/v1", api_key="none", max_retries=0)
    lines = chat_lines(6)
    lines[5]["body"]["messages"][0]["content"] += " [[status:400]]"
    batch = wait_for_batch(client, create_chat_batch(client, lines).id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 5, 1)
    chat, model = "/v1/chat/completions", "local/m-chat"
    eventually(lambda: received.value("finished_total", endpoint=chat, status="completed") == 1)
    assert received.value("created_total", endpoint=chat) == 1
    eventually(lambda: received.value("requests_total", endpoint=chat, model=model, outcome="succeeded") == 5)
    assert received.value("requests_total", endpoint=chat, model=model, outcome="http_400") == 1
    assert received.value("request_duration_seconds", endpoint=chat, model=model, outcome="succeeded") == 5
    assert received.value("queue_wait_seconds", endpoint=chat) == 1
    assert received.value("result_commit_seconds") >= 1
    # The gauge of unfinished batches and the stack's own route metrics arrive at the same receiver.
    eventually(lambda: PREFIX + "batches" in received.names())
    assert any(not name.startswith(PREFIX) for name in received.names())  # the stack's own metrics too
    # The stack's inference metrics count batch requests as they count a client's: they run through its router.
    eventually(lambda: received.inference_requests(model) >= 6)
    eventually(lambda: any(span.name == "batches.job" for span in received.spans))
    with received.lock:
        jobs = [span for span in received.spans if span.name == "batches.job"]
        batch_ids = {a.value.string_value for span in jobs for a in span.attributes if a.key == "batch_id"}
        requests = [span for span in received.spans if span.name == "batches.request"]
    assert batch.id in batch_ids
    assert len(requests) >= 6
    with received.lock:  # what an operator's collector received, for the record
        sample = sorted(
            f"{name} {dict(sorted(attributes))} {value}" for (name, attributes), value in received.points.items()
        )
    (run_dir / "otel-metrics.txt").write_text("\n".join(line for line in sample if line.startswith(PREFIX)) + "\n")
