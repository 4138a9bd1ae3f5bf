"""A files volume that can go read-only on demand, for tests and benchmarks of file-store outages.

As root, a directory's permissions do not stop a process from writing; a read-only mount does. So
the volume is a tmpfs mounted at the directory while in use (root, or CAP_SYS_ADMIN, is needed):

    with tmpfs_volume(path) as read_only:
        read_only(True)    # writes fail with EROFS, as on a volume remounted read-only
        read_only(False)
"""

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class CannotMountError(Exception):
    """This machine does not let the caller mount a tmpfs."""


@contextmanager
def tmpfs_volume(path: Path, megabytes: int = 64) -> Iterator[Callable[[bool], None]]:
    """A tmpfs at `path` while in use; yields a function that makes it read-only (True) or writable (False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        raise CannotMountError(mounted.stderr.decode().strip() or "mount failed")

    def read_only(on: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(path)], check=True)

    try:
        yield read_only
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
