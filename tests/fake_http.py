"""What the tests' fake HTTP servers share: a server on a free port of 127.0.0.1, a quiet request handler
whose answers are one call (status, Content-Type, Content-Length, the handler's own headers, the body),
and `serving`, which runs a server in a daemon thread for the length of a `with` block."""

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer
from typing import Any, ClassVar

# For the openai SDK: do not retry this answer (its own retries would only make the tests slower).
NO_RETRY = {"x-should-retry": "false"}


class FakeServer(ThreadingHTTPServer):
    """A threading HTTP server on a free port of 127.0.0.1."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The base URL of an OpenAI-style API served here."""
        return f"http://127.0.0.1:{self.port}/v1"


class FakeHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing; its answers carry `answer_headers` too."""

    answer_headers: ClassVar[Mapping[str, str]] = {}

    def answer(self, status: int, content_type: str, body: bytes | str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in self.answer_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def answer_json(self, status: int, body: Any) -> None:
        self.answer(status, "application/json", json.dumps(body))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving[S: BaseServer](server: S) -> Iterator[S]:
    """`server` serving in a daemon thread; shut down, closed and its thread joined on the way out."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
