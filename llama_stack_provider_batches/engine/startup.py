"""Starting background work on the server's event loop, without waiting for a first request.

OGX builds its providers on the serving loop and refreshes its routing tables right after, on that
loop: background work starts at that first refresh of the models table. llama-stack builds its
providers inside a temporary event loop (`asyncio.run` in a worker thread) that is closed before the
server starts serving, so a task created while the provider is built dies with that loop. Right
after start-up, on the serving loop, the stack refreshes its routing tables, the models table among
them, which the provider receives as a dependency. Wrapping that table's `refresh` gives the
provider a first call on the serving loop; the API methods call `start` too, for stacks that would
not refresh.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..stack import PROVIDERS_BUILT_ON_SERVING_LOOP


def start_on_serving_loop(models_table: Any, start: Callable[[], None]) -> None:
    """Arrange for `start()` to be called on the first refresh of `models_table` on the serving loop:
    on this loop with OGX, on another one with llama-stack."""
    build_loop = asyncio.get_running_loop()
    refresh: Callable[..., Awaitable[Any]] | None = getattr(models_table, "refresh", None)
    if refresh is None:
        return

    async def refresh_then_start(*args: Any, **kwargs: Any) -> Any:
        if PROVIDERS_BUILT_ON_SERVING_LOOP or asyncio.get_running_loop() is not build_loop:
            start()
        return await refresh(*args, **kwargs)

    models_table.refresh = refresh_then_start


def stop_before(dependency: Any, stop: Callable[[], Awaitable[None]]) -> None:
    """Have `stop()` run before `dependency` shuts down.

    OGX shuts its providers down in the order it built them, the inference router before the batches
    provider: its clients would close under the requests still in flight, which would then run again
    after a restart. Stopping the batches first gives them their grace period.
    """
    shutdown: Callable[[], Awaitable[Any]] | None = getattr(dependency, "shutdown", None)
    if shutdown is None:
        return

    async def stop_then_shut_down() -> Any:
        await stop()
        return await shutdown()

    dependency.shutdown = stop_then_shut_down
