"""What the command-line tests share: batches as a Batch API answers them, and a fake Batch API server
that the real commands (run in a subprocess) talk to."""

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.fake_http import NO_RETRY, FakeHandler, FakeServer, serving


def batch_body(
    batch_id: str, status: str, completed: int = 3, failed: int = 0, total: int | None = None, **extra: Any
) -> dict[str, Any]:
    """A batch as the Batch API answers it; `total` is completed + failed unless given."""
    total = completed + failed if total is None else total
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "created_at": 1_700_000_000,
        "request_counts": {"completed": completed, "failed": failed, "total": total},
        **extra,
    }


class FakeBatchAPI(FakeServer):
    """The part of a Batch API the commands read: GET /v1/batches (`listed`), GET /v1/batches/{id} answered
    from `answers` (a status, a whole batch, or an HTTP error status; the last one repeats), and
    GET /v1/files/{id}/content (`files`)."""

    def __init__(self) -> None:
        super().__init__(FakeBatchHandler)
        self.listed: list[dict[str, Any]] = []
        self.answers: list[str | int | dict[str, Any]] = ["completed"]
        self.files: dict[str, str] = {}
        self.lock = threading.Lock()

    def next_answer(self) -> str | int | dict[str, Any]:
        with self.lock:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class FakeBatchHandler(FakeHandler):
    server: FakeBatchAPI
    answer_headers = NO_RETRY

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/v1/batches":
            self.answer_json(200, {"object": "list", "data": self.server.listed, "has_more": False})
        elif path.startswith("/v1/batches/"):
            answer = self.server.next_answer()
            if isinstance(answer, int):
                self.answer_json(answer, {"error": {"message": "the server is restarting"}})
            else:
                body = answer if isinstance(answer, dict) else batch_body(path.rsplit("/", 1)[-1], answer)
                self.answer_json(200, body)
        elif path.startswith("/v1/files/") and path.endswith("/content"):
            content = self.server.files.get(path.split("/")[3])
            self.answer(200 if content is not None else 404, "application/octet-stream", content or "")
        else:
            self.answer_json(404, {"error": {"message": "no such route"}})


@pytest.fixture
def server() -> Iterator[FakeBatchAPI]:
    with serving(FakeBatchAPI()) as fake:
        yield fake
