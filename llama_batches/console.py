"""The rich console every command writes through."""

import errno

from rich.console import Console as RichConsole


class Console(RichConsole):
    """A rich console that reports a closed pipe (`| head`) like any other write does, by raising
    BrokenPipeError: rich's own answer is exit status 1, which here means that some requests failed."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write: the progress bar's last redraw must not raise again
        raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")
