"""Driving command-line processes in tests: the `llama-batches` command line, and interrupting one."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LLAMA_BATCHES = [sys.executable, "-m", "llama_batches"]


def cli_env(base_url: str) -> dict[str, str]:
    """The environment of a `llama-batches` process talking to the Batch API at `base_url` (".../v1"),
    with tracebacks off as a user has them."""
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "none"}
    env.pop("LLAMA_BATCHES_DEBUG", None)
    return env


def llama_batches(
    base_url: str, *args: str | Path, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `llama-batches ARGS` against `base_url` to its end; its output as text."""
    command = [*LLAMA_BATCHES, *map(str, args)]
    return subprocess.run(command, env=cli_env(base_url), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def interrupt_when(process: subprocess.Popen[bytes], stderr_path: Path, ready: Callable[[str], bool]) -> None:
    """Send SIGINT to `process` once its stderr (written to `stderr_path`) shows `ready`, and wait for it
    to end; fail if it ends first or nothing is ready within 30 s. The process is killed if it lingers."""
    try:
        deadline = time.monotonic() + 30
        while not ready(stderr_path.read_text()):
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
