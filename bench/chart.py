"""Drawing bench/compare.py's results: requests finished over time, this provider against the built-in
one, one panel per workload (a PNG, with matplotlib: `pip install -e '.[bench]'`)."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt

LABELS = {"ours": "llama-stack-provider-batches", "builtin": "built-in inline::reference"}
COLOURS = {"ours": "tab:blue", "builtin": "tab:orange"}


def draw_progress(results: Sequence[Any], workloads: Sequence[Any], path: Path) -> None:
    """Write a chart of each result's `progress` (seconds, requests finished), a panel per workload."""
    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads, strict=True):
        for result in (r for r in results if r.workload == workload.name):
            seconds = [0.0] + [t for t, _ in result.progress]
            finished = [0] + [n for _, n in result.progress]
            label = f"{LABELS.get(result.provider, result.provider)} ({result.seconds:.0f} s)"
            axis.step(seconds, finished, where="post", label=label, color=COLOURS.get(result.provider))
        if workload.ideal_seconds:
            axis.plot([0, workload.ideal_seconds], [0, workload.requests], ":", color="grey", label="ideal")
        axis.set_title(f"{workload.name}: {workload.requests} requests, concurrency {workload.concurrency}")
        axis.set_xlabel("seconds since create")
        axis.set_ylabel("requests finished")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
