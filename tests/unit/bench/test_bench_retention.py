"""bench/retention.py: the sweep benchmark fills a store as the provider writes it and empties it."""

from pathlib import Path

from bench.retention import bench_sweep


async def test_the_sweep_bench_fills_a_store_and_the_sweep_leaves_nothing(tmp_path: Path) -> None:
    figures = await bench_sweep("sqlite", 30, tmp_path)
    assert figures["batches"] == 30 and figures["left"] == 0
    assert isinstance(figures["record_bytes"], int) and figures["record_bytes"] > 500
