import asyncio
import threading

from llama_stack_provider_batches.startup import start_on_serving_loop


class ModelsTable:
    def __init__(self) -> None:
        self.refreshes = 0

    async def refresh(self) -> None:
        self.refreshes += 1


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


async def test_a_table_without_refresh_is_left_alone() -> None:
    table = object()
    start_on_serving_loop(table, lambda: None)
    assert not hasattr(table, "refresh")
