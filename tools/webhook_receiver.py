"""A webhook receiver on 127.0.0.1 for tests and benchmarks: it records what it is sent and answers
with the statuses it is told to (the last one from then on), as a user's endpoint would.

    with WebhookReceiver(500, 500, 200) as receiver:
        client.webhooks.create(name="r", url=receiver.url, event_types=[...])
        receiver.wait_for(1)
        receiver.events(secret)     # verified with the OpenAI SDK's `webhooks.unwrap`, as a user's code does
"""

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from openai import OpenAI

VERIFIER = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


@dataclass(frozen=True)
class Received:
    body: bytes
    headers: dict[str, str]
    at: float  # time.time() when it arrived
    answered: int


class WebhookReceiver:
    def __init__(self, *statuses: int, path: str = "/hook") -> None:
        self.statuses = list(statuses) or [200]
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                    receiver.received.append(Received(body, dict(self.headers), time.time(), status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}{path}"

    def answer(self, *statuses: int) -> None:
        """Answer with these statuses from now on."""
        with self._lock:
            self.statuses = list(statuses)

    def wait_for(self, count: int, timeout: float = 30, accepted: bool = False) -> list[Received]:
        """Wait until `count` deliveries arrived (answered 2xx, if `accepted`); return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = [r for r in self.received if not accepted or 200 <= r.answered < 300]
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"{len(got)} of {count} webhook deliveries arrived in {timeout} s")

    def events(self, secret: str, accepted: bool = True) -> list[Any]:
        """The events received (answered 2xx, if `accepted`), each verified as a user's code would."""
        with self._lock:
            chosen = [r for r in self.received if not accepted or 200 <= r.answered < 300]
        return [VERIFIER.webhooks.unwrap(r.body, r.headers, secret=secret) for r in chosen]

    def __enter__(self) -> "WebhookReceiver":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
