"""Make the tokenizer file the stack's vector stores need available offline (`make setup` runs this).

run.yaml serves the Responses API, which needs a vector_io provider; the stack's vector stores load
tiktoken's `cl100k_base` encoding when they start, and tiktoken downloads it from
openaipublic.blob.core.windows.net the first time. On a machine that cannot reach that host (CI,
an air-gapped server) the stack then fails to start. This puts the file in CACHE_DIR, which
tools/serve.py and the tests pass to the stack as TIKTOKEN_CACHE_DIR:

1. from tiktoken's own download, where the host can be reached;
2. otherwise from the litellm wheel on the package index, which ships the same file for offline
   use (only that file is extracted; litellm is not installed).

Either way the file is checked against the SHA-256 tiktoken itself expects. With TIKTOKEN_CACHE_DIR
already set, nothing is done.

    python tools/tiktoken_cache.py      # prints the cache directory
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".venv" / "tiktoken-cache"
URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken's expected_hash
CACHE_KEY = hashlib.sha1(URL.encode()).hexdigest()  # the file name tiktoken looks for in its cache
WHEEL = "litellm==1.110.2"
WHEEL_MEMBER = f"litellm/litellm_core_utils/tokenizers/{CACHE_KEY}"


def is_valid(data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == SHA256


def download() -> bytes | None:
    try:
        with urllib.request.urlopen(URL, timeout=15) as response:
            return response.read()
    except OSError:
        return None


def from_wheel() -> bytes | None:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", scratch]
        if subprocess.run(command, capture_output=True, timeout=600).returncode != 0:
            return None
        for wheel in Path(scratch).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                if WHEEL_MEMBER in archive.namelist():
                    return archive.read(WHEEL_MEMBER)
    return None


def ensure_cache() -> Path:
    """The directory holding a verified cl100k_base file; exits with a message if none can be had."""
    target = CACHE_DIR / CACHE_KEY
    if target.exists() and is_valid(target.read_bytes()):
        return CACHE_DIR
    for source in (download, from_wheel):
        data = source()
        if data is not None and is_valid(data):
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            # Written aside, then renamed: both environments' setups may run this at once (.ci/run).
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            partial.write_bytes(data)
            os.replace(partial, target)
            return CACHE_DIR
    sys.exit(
        f"Cannot get tiktoken's cl100k_base encoding ({URL}) for the stack's vector stores.\n"
        f"Download it on a connected machine, save it as {target}, or set TIKTOKEN_CACHE_DIR."
    )


def main() -> None:
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        print(os.environ["TIKTOKEN_CACHE_DIR"])
        return
    print(ensure_cache())


if __name__ == "__main__":
    main()
