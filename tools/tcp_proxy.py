"""A TCP proxy that can cut a client off from a server: a network partition, for tests and benchmarks.

It forwards every connection made to its port to the target. `cut()` drops every connection through
it and refuses new ones (they are accepted and closed at once, as a firewall's reset does) until
`heal()`. `silence()` is the other kind of partition, where packets are lost rather than refused:
connections stay open and new ones are accepted, but nothing gets through either way and no error
comes, until `heal()` lets what was held go on (as TCP does once the network is back). The target
itself goes on serving everyone else. It runs on its own thread and event loop,
so the process that starts it (pytest, a benchmark) may block meanwhile.

    with TcpProxy(target_port=5432) as proxy:
        env = {"POSTGRES_PORT": str(proxy.port)}   # this client reaches the server through the proxy
        proxy.cut(); time.sleep(20); proxy.heal()
"""

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK_BYTES = 65536


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` until stopped."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0  # known once started
        self.refused = 0  # connections refused while cut
        self._cut = False
        self._flowing = asyncio.Event()  # cleared while silenced; set and cleared on the proxy's loop
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Drop every connection through the proxy, and refuse new ones until `heal`."""
        self._call(self._cut_off())

    def silence(self) -> None:
        """Let nothing through, and say nothing, until `heal`: connections hang rather than fail."""
        self._call(self._set_flowing(False))

    def heal(self) -> None:
        """Let connections through again (and what a silence held)."""
        self._cut = False
        self._call(self._set_flowing(True))

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut_off(self) -> None:
        self._cut = True
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, not a polite close: the client sees the connection die

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._cut_off()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            client_writer.transport.abort()
            return
        await self._flowing.wait()  # silenced: the client's connect hangs in the (lost) handshake
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:  # the target is down: the client sees its connection closed, as with no proxy
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, server_writer))
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        finally:
            for writer in (client_writer, server_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK_BYTES):
                await self._flowing.wait()  # silenced: held, as the network would lose and resend it
                if self._cut:
                    break
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    def __enter__(self) -> "TcpProxy":
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
