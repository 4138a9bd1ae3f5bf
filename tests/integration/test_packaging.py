"""The package builds a clean wheel and sdist (what `make dist` does), holding the provider, the
command line and its entry point, with no warning from the project's own metadata."""

import subprocess
import sys
import zipfile
from pathlib import Path

from tools.harness import REPO


def test_the_wheel_and_sdist_build_cleanly(tmp_path: Path) -> None:
    done = subprocess.run(
        # No isolation: the build uses this environment's setuptools, so it works offline.
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Deprecat" not in output and "BuildBackendWarning" not in output, output[-3000:]
    wheels, sdists = list(tmp_path.glob("*.whl")), list(tmp_path.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "llama_stack_provider_batches/provider.py" in names
    assert "llama_batches/cli.py" in names
    assert "llama-batches = llama_batches.cli:main" in entry_points
    assert not any(name.startswith(("tests/", "tools/", "bench/")) for name in names)
