import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tools.tcp_proxy import TcpProxy


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with TcpProxy(target_port=server.server_address[1]) as proxy:
        yield proxy
    server.shutdown()
    server.server_close()


def echo(connection: socket.socket, data: bytes) -> bytes:
    connection.sendall(data)
    received = b""
    while len(received) < len(data) and (chunk := connection.recv(1024)):
        received += chunk
    return received


def test_traffic_goes_through_until_cut_and_again_once_healed(proxy: TcpProxy) -> None:
    before = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert echo(before, b"hello") == b"hello"
    proxy.cut()
    try:
        answer = echo(before, b"still there?")
    except OSError:  # reset
        answer = b""
    assert answer == b""  # the connection through the proxy is dropped ...
    during = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert during.recv(1024) == b""  # ... and a new one is closed at once
    assert proxy.refused == 1
    proxy.heal()
    after = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert echo(after, b"back") == b"back"
    for connection in (before, during, after):
        connection.close()


def test_a_silence_holds_traffic_without_an_error_and_lets_it_on_once_healed(proxy: TcpProxy) -> None:
    before = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert echo(before, b"hello") == b"hello"
    proxy.silence()
    before.settimeout(0.3)
    before.sendall(b"anyone?")
    with pytest.raises(TimeoutError):  # no answer, and no reset either: the packets are lost
        before.recv(1024)
    during = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # accepted ...
    during.sendall(b"new")
    during.settimeout(0.3)
    with pytest.raises(TimeoutError):  # ... and nothing comes back
        during.recv(1024)
    proxy.heal()
    before.settimeout(5)
    during.settimeout(5)
    assert before.recv(1024) == b"anyone?"  # what was held goes on
    assert during.recv(1024) == b"new"
    assert proxy.refused == 0
    for connection in (before, during):
        connection.close()
