import asyncio
import threading

import pytest

from llama_stack_provider_batches.engine.startup import start_on_serving_loop, stop_before
from llama_stack_provider_batches.stack import PROVIDERS_BUILT_ON_SERVING_LOOP


class ModelsTable:
    def __init__(self) -> None:
        self.refreshes = 0

    async def refresh(self) -> None:
        self.refreshes += 1


@pytest.mark.skipif(PROVIDERS_BUILT_ON_SERVING_LOOP, reason="OGX builds providers on the serving loop")
async def test_start_waits_for_a_refresh_on_another_loop() -> None:
    table = ModelsTable()
    starts: list[int] = []
    start_on_serving_loop(table, lambda: starts.append(1))

    await table.refresh()  # on the loop the provider was built in: as during stack initialisation
    assert starts == []

    thread = threading.Thread(target=lambda: asyncio.run(table.refresh()))  # the serving loop
    thread.start()
    thread.join()
    assert starts == [1]
    assert table.refreshes == 2


@pytest.mark.skipif(not PROVIDERS_BUILT_ON_SERVING_LOOP, reason="llama-stack builds providers on a loop of their own")
async def test_on_ogx_the_first_refresh_on_the_serving_loop_starts() -> None:
    table = ModelsTable()
    starts: list[int] = []
    start_on_serving_loop(table, lambda: starts.append(1))
    assert starts == []  # not while the provider is being built
    await table.refresh()  # the stack's refresh right after building its providers, on the same loop
    assert starts == [1]


async def test_a_table_without_refresh_is_left_alone() -> None:
    table = object()
    start_on_serving_loop(table, lambda: None)
    assert not hasattr(table, "refresh")


async def test_stop_before_runs_the_stop_first_then_the_dependencys_shutdown() -> None:
    order: list[str] = []

    class Router:
        async def shutdown(self) -> None:
            order.append("router")

    async def stop() -> None:
        order.append("batches")

    router = Router()
    stop_before(router, stop)
    await router.shutdown()
    assert order == ["batches", "router"]
