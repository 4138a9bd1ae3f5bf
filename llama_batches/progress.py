"""Showing a batch while it runs: a rich progress bar on a terminal, otherwise a line per status change and
one every half minute between (logs and CI keep a readable record, without a redraw per poll)."""

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from openai.types import Batch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from llama_batches.console import Console

LINE_EVERY_SECONDS = 30.0  # without a terminal: how often to print the counts while the status stays the same


def counts(batch: Batch) -> tuple[int, int, int]:
    """(completed, failed, total) requests of a batch; zeros before the server has counted them."""
    request_counts = batch.request_counts
    if request_counts is None:
        return 0, 0, 0
    return request_counts.completed, request_counts.failed, request_counts.total


def format_seconds(seconds: float) -> str:
    whole = round(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


class RateMeter:
    """Requests per second since following began, and the time left at that rate.

    Measured from the first state seen, not from zero: a batch re-attached half-way through has not
    just done half its requests in one poll.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start: tuple[float, int] | None = None

    def update(self, done: int, total: int) -> tuple[float | None, float | None]:
        """(requests per second, seconds left), each None while unknown."""
        now = self.clock()
        if self.start is None or total == 0:
            self.start = (now, done)
            return None, None
        started, done_then = self.start
        if now <= started or done <= done_then:
            return None, None
        rate = (done - done_then) / (now - started)
        return rate, (total - done) / rate


def rate_text(rate: float | None) -> str:
    return f"{rate:.1f} req/s" if rate else ""


def eta_text(left: float | None, status: str) -> str:
    return f"ETA {format_seconds(left)}" if left is not None and status == "in_progress" else ""


def status_line(batch: Batch) -> str:
    """One line for a batch's state: id, status and counts."""
    completed, failed, total = counts(batch)
    line = f"{batch.id}: {batch.status}"
    if total:
        line += f" ({completed + failed}/{total} done, {failed} failed)"
    return line


class BatchProgress:
    """A context manager: call `update(batch)` with each state polled, `say(message)` for a note."""

    def __init__(
        self,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        line_every: float = LINE_EVERY_SECONDS,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.line_every = line_every
        self.meter = RateMeter(clock)
        self.last_status: str | None = None
        self.last_line_at = 0.0
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[status]:<11}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"),
                console=self.console,
                transient=False,
            )

    def __enter__(self) -> Self:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("batch", total=None, status="waiting", failed=0, rate="", eta="")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.progress is not None:
            self.progress.stop()

    def say(self, message: str) -> None:
        """A line on the console (above the bar on a terminal)."""
        self.console.print(message, highlight=False, soft_wrap=True, markup=False)

    def update(self, batch: Batch) -> None:
        completed, failed, total = counts(batch)
        rate, left = self.meter.update(completed + failed, total)
        if self.progress is None or self.task is None:
            now = self.clock()
            # A line per status change, not per poll; and the counts now and then, or a long batch shows one line.
            if batch.status != self.last_status or now - self.last_line_at >= self.line_every:
                pace = " ".join(part for part in (rate_text(rate), eta_text(left, batch.status)) if part)
                self.say(f"{status_line(batch)} {pace}".rstrip())
                self.last_line_at = now
        else:
            self.progress.update(
                self.task,
                total=total or None,  # None: an indeterminate bar while the server validates
                completed=completed + failed,
                status=batch.status,
                failed=failed,
                rate=rate_text(rate),
                eta=eta_text(left, batch.status),
            )
        self.last_status = batch.status
