"""A webhook receiver on 127.0.0.1 for tests and benchmarks: it records what it is sent and answers
with the statuses it is told to (the last one from then on), as a user's endpoint would.

    with WebhookReceiver(500, 500, 200) as receiver:
        client.webhooks.create(name="r", url=receiver.url, event_types=[...])
        receiver.wait_for(1)
        receiver.events(secret)     # verified with the OpenAI SDK's `webhooks.unwrap`, as a user's code does

The status HANG makes it a receiver that hangs: it reads the request and never answers, holding the
connection until the sender gives up and closes it (`WebhookReceiver(HANG, 200)`: the first delivery
hangs, the next ones are answered 200).
"""

import select
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from openai import OpenAI

VERIFIER = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
HANG = 0  # not an HTTP status: take the request, never answer it


@dataclass(frozen=True)
class Received:
    body: bytes
    headers: dict[str, str]
    at: float  # time.time() when it arrived
    answered: int  # the status answered, or HANG
    closed_at: float | None = None  # HANG: when the sender gave up and closed the connection (None: it never did)


class WebhookReceiver:
    def __init__(self, *statuses: int, path: str = "/hook") -> None:
        self.statuses = list(statuses) or [200]
        self.received: list[Received] = []  # a HANG delivery is added when the sender gives up on it
        self._hanging = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                at = time.time()
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                    if status == HANG:
                        receiver._hanging += 1
                    else:
                        receiver.received.append(Received(body, dict(self.headers), at, status))
                if status == HANG:
                    closed_at = receiver._hold(self.connection)
                    with receiver._lock:
                        receiver._hanging -= 1
                        receiver.received.append(Received(body, dict(self.headers), at, HANG, closed_at))
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}{path}"

    def _hold(self, connection: Any) -> float | None:
        """Hold a connection without answering until the sender closes it; when it did (None: it did not
        before this receiver stopped)."""
        while not self._stopping.is_set():
            readable, _, _ = select.select([connection], [], [], 0.1)
            if not readable:
                continue
            try:
                if not connection.recv(4096):
                    return time.time()
            except OSError:
                return time.time()
        return None

    @property
    def hanging(self) -> int:
        """How many requests are held unanswered now."""
        with self._lock:
            return self._hanging

    def wait_hanging(self, count: int, timeout: float = 30) -> None:
        """Wait until `count` requests are held unanswered at once."""
        deadline = time.monotonic() + timeout
        while self.hanging < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.hanging} of {count} webhook deliveries held in {timeout} s")
            time.sleep(0.02)

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
        self._stopping.set()  # held requests end
        self._server.shutdown()
        self._server.server_close()
