"""bench/chart.py draws a PNG of requests finished over time from compare.py's results."""

from pathlib import Path

from bench.chart import draw_progress
from bench.compare import WORKLOADS, Result


def test_a_chart_of_both_providers_is_written(tmp_path: Path) -> None:
    ours = Result("ours", "latency", seconds=15.0, progress=[(1.0, 100), (15.0, 600)])
    builtin = Result("builtin", "latency", seconds=30.0, progress=[(2.0, 50), (30.0, 600)])
    chart = tmp_path / "compare.png"
    draw_progress([ours, builtin], [WORKLOADS["latency"]], chart)
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert chart.stat().st_size > 10_000  # axes, two curves and a legend, not an empty canvas
