"""Driving command-line processes in tests."""

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


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
