"""Start the stack with this provider, as `make run` does.

With MODEL_URL set (an OpenAI-compatible server: vLLM, Ollama, OpenAI...), the stack sends batch
requests there. Without it, this also starts the stand-in model server, which runs no model, so
that a first batch completes on any machine; it says so loudly.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.tiktoken_cache import ensure_cache  # noqa: E402  (tools/ is not a package on sys.path)


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the stand-in model server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"the stand-in model server did not answer at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8321)))
    parser.add_argument("--standin-port", type=int, default=int(os.environ.get("STANDIN_PORT", 8000)))
    args = parser.parse_args()

    env = dict(os.environ)
    if not env.get("TIKTOKEN_CACHE_DIR"):  # run.yaml's vector store needs it at start
        env["TIKTOKEN_CACHE_DIR"] = str(ensure_cache())
    standin = None
    if not env.get("MODEL_URL"):
        command = [sys.executable, str(REPO / "tools" / "standin_model_server.py"), "--port", str(args.standin_port)]
        standin = subprocess.Popen(command)
        wait_for(f"http://127.0.0.1:{args.standin_port}/health", standin)
        env["MODEL_URL"] = f"http://127.0.0.1:{args.standin_port}/v1"
        print(
            "\n*** MODEL_URL is not set: using the STAND-IN model server at "
            f"{env['MODEL_URL']}.\n*** It runs no model; its answers are echoes of the prompts.\n"
            "*** For real answers: MODEL_URL=http://<vllm-or-ollama-host>:<port>/v1 make run\n",
            flush=True,
        )
    stack = subprocess.Popen(
        [str(Path(sys.executable).parent / "llama"), "stack", "run", str(REPO / "run.yaml"), "--port", str(args.port)],
        env=env,
    )

    def forward(signum: int, _frame: object) -> None:
        stack.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = stack.wait()
    finally:
        if standin is not None:
            standin.terminate()
            standin.wait(10)
    sys.exit(code)


if __name__ == "__main__":
    main()
