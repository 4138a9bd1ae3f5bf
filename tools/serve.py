"""Start the stack with this provider, as `make run` does.

With MODEL_URL set (an OpenAI-compatible server: vLLM, Ollama, OpenAI...), the stack sends batch
requests there. Without it, this also starts the stand-in model server, which runs no model, so
that a first batch completes on any machine; it says so loudly.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.harness import RUN_YAML, stack_command  # noqa: E402  (tools/ is not a package on sys.path)
from tools.tiktoken_cache import ensure_cache  # noqa: E402

STANDIN = REPO / "tools" / "standin_model_server.py"


def wait_for(
    url: str, process: subprocess.Popen[bytes], stopped: Callable[[], bool] = lambda: False, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopped():
        if process.poll() is not None:
            sys.exit(f"the stand-in model server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    if not stopped():
        sys.exit(f"the stand-in model server did not answer at {url}")


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on `port` (another `make run`, say)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


BACKEND_CHECK_SECONDS = 3.0
RESTART_ADVICE = "the stack lists a backend's models when it starts: fix that, then restart this server"


def backend_trouble(model_url: str, api_key: str | None, timeout: float = BACKEND_CHECK_SECONDS) -> str | None:
    """One line saying what is wrong with the model server at `model_url`, or None if it lists models.

    Asks GET {model_url}/models as the stack does when it starts (with the same key): a server that
    does not answer then leaves the stack without its models, so that every batch naming one fails
    validation with `model_not_found` until the stack restarts.
    """
    said = f"*** MODEL_URL {model_url}"
    not_openai = "is it an OpenAI-compatible server?"
    request = urllib.request.Request(
        model_url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key or 'none'}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            listing = json.loads(response.read())
    except urllib.error.HTTPError as refusal:  # before OSError, of which it is a kind
        return f"{said} answered GET /models with HTTP {refusal.code} (MODEL_API_KEY?); {RESTART_ADVICE}."
    except OSError as failure:  # refused, unknown host, no answer in time
        reason = getattr(failure, "reason", failure)
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        return f"{said} does not answer ({reason}); {RESTART_ADVICE}."
    except ValueError:
        return f"{said} answered GET /models with something other than JSON: {not_openai}"
    except http.client.HTTPException as failure:  # something listens there, but does not speak HTTP
        return f"{said} does not answer as an HTTP server ({type(failure).__name__}): {not_openai}"
    models = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(models, list):
        return f"{said} answered GET /models without a model list: {not_openai}"
    if not models:
        return f"{said} lists no models (pull or load one there); {RESTART_ADVICE}."
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8321)))
    parser.add_argument("--standin-port", type=int, default=int(os.environ.get("STANDIN_PORT", 8000)))
    args = parser.parse_args()

    env = dict(os.environ)
    host = env.setdefault("STACK_HOST", "127.0.0.1")  # run.yaml's server.host
    local = "127.0.0.1"  # the stand-in serves this machine only, whatever the stack does
    ports = [(host, "the stack", args.port)]
    if not env.get("MODEL_URL"):
        ports.append((local, "the stand-in model server", args.standin_port))
    for address, name, port in ports:
        if port_taken(address, port):
            sys.exit(
                f"Port {port} on {address}, for {name}, is already in use (another `make run`?). "
                "Stop it, or choose other ports: PORT=... STANDIN_PORT=... make run"
            )
    if not env.get("TIKTOKEN_CACHE_DIR"):  # run.yaml's vector store needs it at start
        env["TIKTOKEN_CACHE_DIR"] = str(ensure_cache())
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            child.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        if not env.get("MODEL_URL"):
            command = [sys.executable, str(STANDIN), "--host", local, "--port", str(args.standin_port)]
            # Own sessions: a Ctrl-C reaches this process only, which stops the children in order.
            children.append(subprocess.Popen(command, start_new_session=True))
            wait_for(f"http://{local}:{args.standin_port}/health", children[0], lambda: stopping)
            env["MODEL_URL"] = f"http://{local}:{args.standin_port}/v1"
            print(
                "\n*** MODEL_URL is not set: using the STAND-IN model server at "
                f"{env['MODEL_URL']}.\n*** It runs no model; its answers are echoes of the prompts.\n"
                "*** For real answers: MODEL_URL=http://<vllm-or-ollama-host>:<port>/v1 make run\n",
                flush=True,
            )
        if not stopping:
            # Asked while the stack starts (it asks too, once, then keeps what it got); told with the banner.
            checker = ThreadPoolExecutor(max_workers=1)
            backend_check = checker.submit(backend_trouble, env["MODEL_URL"], env.get("MODEL_API_KEY"))
            checker.shutdown(wait=False)
            command = stack_command(RUN_YAML, args.port)  # llama-stack's, or OGX's where that is installed
            stack = subprocess.Popen(command, env=env, start_new_session=True)
            children.insert(0, stack)  # stopped first: it may still be sending to the stand-in
            health = f"http://{local if host in ('0.0.0.0', '::') else host}:{args.port}/v1/health"
            while stack.poll() is None and not stopping and not answers(health):
                time.sleep(0.5)
            if stack.poll() is None and not stopping:
                print(
                    f"*** Serving on http://{host}:{args.port} (STACK_HOST=0.0.0.0 serves other machines). "
                    "Ctrl-C stops.",
                    flush=True,
                )
                trouble = backend_check.result()  # long done: its timeouts are shorter than a stack's start
                if trouble:
                    print(trouble, flush=True)
            code = stack.wait()
    finally:
        for child in children:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
    sys.exit(0 if stopping else code)


if __name__ == "__main__":
    main()
