"""`make run` (tools/serve.py) asks the model server at MODEL_URL for its models when it starts, and says
in one line what is wrong when it does not answer, refuses, or lists none; fake model servers here."""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fake_http import FakeHandler, FakeServer, serving
from tools.serve import RESTART_ADVICE, backend_trouble


class FakeModelServer(FakeServer):
    """GET /v1/models answers `status` with `body` (after `delay` seconds); it records the Authorization header."""

    def __init__(self) -> None:
        super().__init__(FakeModelsHandler)
        self.status = 200
        self.body: Any = {"object": "list", "data": [{"id": "llama3.2:3b", "object": "model"}]}
        self.delay = 0.0
        self.authorization: str | None = None


class FakeModelsHandler(FakeHandler):
    server: FakeModelServer

    def do_GET(self) -> None:
        self.server.authorization = self.headers.get("Authorization")
        time.sleep(self.server.delay)
        body = self.server.body if isinstance(self.server.body, bytes) else json.dumps(self.server.body)
        status = self.server.status if self.path == "/v1/models" else 404
        with contextlib.suppress(BrokenPipeError):  # the check gave up waiting (the slow server's test)
            self.answer(status, "application/json", body)


@pytest.fixture
def model_server() -> Iterator[FakeModelServer]:
    with serving(FakeModelServer()) as server:
        yield server


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # nothing listens once it is closed


def test_a_server_that_lists_models_is_fine_and_gets_the_stacks_key(model_server: FakeModelServer) -> None:
    assert backend_trouble(model_server.url + "/", "sk-local") is None
    assert model_server.authorization == "Bearer sk-local"
    assert backend_trouble(model_server.url, None) is None
    assert model_server.authorization == "Bearer none"  # run.yaml's default MODEL_API_KEY


def test_a_server_that_does_not_answer_is_one_line_naming_it() -> None:
    url = closed_url()
    said = backend_trouble(url, None)
    assert said == f"*** MODEL_URL {url} does not answer ([Errno 111] Connection refused); {RESTART_ADVICE}."


def test_a_server_too_slow_to_answer_is_given_up_on_quickly(model_server: FakeModelServer) -> None:
    model_server.delay = 2
    started = time.monotonic()
    said = backend_trouble(model_server.url, None, timeout=0.2)
    assert time.monotonic() - started < 1.5
    assert said == f"*** MODEL_URL {model_server.url} does not answer (no answer within 0.2 s); {RESTART_ADVICE}."


def test_a_server_that_lists_no_models_says_so(model_server: FakeModelServer) -> None:
    model_server.body = {"object": "list", "data": []}
    assert backend_trouble(model_server.url, None) == (
        f"*** MODEL_URL {model_server.url} lists no models (pull or load one there); {RESTART_ADVICE}."
    )


def test_a_refusal_names_its_status(model_server: FakeModelServer) -> None:
    model_server.status, model_server.body = 401, {"error": {"message": "bad key"}}
    assert backend_trouble(model_server.url, "wrong") == (
        f"*** MODEL_URL {model_server.url} answered GET /models with HTTP 401 (MODEL_API_KEY?); {RESTART_ADVICE}."
    )


@pytest.mark.parametrize(
    ("body", "answer"),
    [(b"<html>hello</html>", "with something other than JSON"), ({"models": []}, "without a model list")],
)
def test_a_server_that_is_not_openai_compatible_says_so(model_server: FakeModelServer, body: Any, answer: str) -> None:
    model_server.body = body
    assert backend_trouble(model_server.url, None) == (
        f"*** MODEL_URL {model_server.url} answered GET /models {answer}: is it an OpenAI-compatible server?"
    )


def test_something_that_does_not_speak_http_is_one_line_too() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def babble() -> None:
        connection, _ = listener.accept()
        connection.recv(1024)
        connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        connection.close()

    threading.Thread(target=babble, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        said = backend_trouble(url, None)
    finally:
        listener.close()
    assert said is not None and said.startswith(f"*** MODEL_URL {url} does not answer as an HTTP server")
