"""`make demo` (tools/demo.py): the stack of `make run` on PORT, LLAMA_STACK_URL for another one, and a
stack it cannot reach or that refuses it told in one line, not in the SDK's chained tracebacks."""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fake_http import FakeHandler, FakeServer, serving
from tools.harness import REPO

DEMO = REPO / "tools" / "demo.py"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


def demo(**variables: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in ("PORT", "LLAMA_STACK_URL", "STACK_HOST")}
    return subprocess.run(
        [sys.executable, str(DEMO)], env={**env, **variables}, capture_output=True, text=True, timeout=120
    )


def test_a_stack_that_is_not_running_is_one_line_naming_where_it_looked() -> None:
    port = closed_port()
    result = demo(PORT=str(port))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot reach the stack at http://127.0.0.1:{port}: is `make run` serving there? "
        "(PORT=<port> make demo for another port of `make run`, LLAMA_STACK_URL=<url> for another stack)"
    ]
    assert result.stdout == ""


def test_llama_stack_url_overrides_the_port() -> None:
    port, elsewhere = closed_port(), closed_port()
    result = demo(PORT=str(port), LLAMA_STACK_URL=f"http://127.0.0.1:{elsewhere}/")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach the stack at http://127.0.0.1:{elsewhere}:")


class Refusing(FakeHandler):
    def do_GET(self) -> None:
        self.answer_json(401, {"error": {"message": "Invalid API key.", "type": "invalid_request_error"}})


@pytest.fixture
def refusing_stack() -> Iterator[int]:
    with serving(FakeServer(Refusing)) as server:
        yield server.port


def test_a_refusal_is_one_line_too(refusing_stack: int) -> None:
    result = demo(PORT=str(refusing_stack))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: the stack at http://127.0.0.1:{refusing_stack} answered 401: ")
    assert "Invalid API key." in line


def test_make_demo_passes_its_port() -> None:
    planned = subprocess.run(
        ["make", "-n", "demo", "PORT=4321"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    [command] = [line for line in planned.stdout.splitlines() if "tools/demo.py" in line]
    assert command.endswith("tools/demo.py --port 4321")
