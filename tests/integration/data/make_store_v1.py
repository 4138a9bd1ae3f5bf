"""Write the `store-v1` upgrade fixture: a state directory left by the released code (commit 8ba69ed).

Run it with the released package first on PYTHONPATH; the stand-in, run.yaml and the harness all
come from that checkout, so the stack it starts is the old code with the old configuration:

    git worktree add /tmp/release-8ba69ed 8ba69ed
    PYTHONPATH=/tmp/release-8ba69ed .venv/bin/python tests/integration/data/make_store_v1.py
    git worktree remove --force /tmp/release-8ba69ed

It starts the stand-in model server, an authentication endpoint for two users (alice, bob, with
disjoint attributes) and `llama stack run` on a fresh STATE_DIR; creates finished, cancelled and
failed batches for both users; starts a large batch for alice and SIGKILLs the stack a third of the
way through it. The state directory and `manifest.json` (what a later test should find) are packed
into `store-v1.tar.gz` next to this script.
"""

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from openai import OpenAI
from openai.types import Batch

import llama_stack_provider_batches

RELEASE_COMMIT = "8ba69ed"
RELEASE_ROOT = Path(llama_stack_provider_batches.__file__).resolve().parents[1]
sys.path.insert(0, str(RELEASE_ROOT))  # the harness of the checkout the package is imported from

from tools.harness import (  # noqa: E402
    REPO,
    ServerProcess,
    StandInControl,
    run_yaml_with_auth,
    start_stack,
    start_standin,
    warm_up,
)

HERE = Path(__file__).resolve().parent
MODEL = "local/m-chat"
USERS: dict[str, dict[str, Any]] = {  # disjoint attributes: each user sees only their own batches
    "alice": {"token": "upgrade-alice-token", "principal": "alice", "attributes": {"roles": ["alice-role"]}},
    "bob": {"token": "upgrade-bob-token", "principal": "bob", "attributes": {"roles": ["bob-role"]}},
}
STACK_ENV = {"BATCHES_KV_NAMESPACE": "batches"}  # run.yaml's default, spelled out for the manifest
UNFINISHED_REQUESTS = 300
UNFINISHED_STOP_AT = UNFINISHED_REQUESTS // 3 - 10  # requests in flight at the freeze finish too
WINDOW = 10  # run.yaml's max_concurrent_requests_per_batch


class TokenToUser(BaseHTTPRequestHandler):
    """The stack's `custom` authentication provider posts {"api_key": ...} here."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = next((u for u in USERS.values() if u["token"] == body.get("api_key")), None)
        answer = {"principal": user["principal"], "attributes": user["attributes"]} if user else {"error": "no"}
        self.send_response(200 if user else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(answer).encode())

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def auth_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenToUser)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/auth"
    finally:
        server.shutdown()


def check_release_code() -> str:
    """Fail unless the package, the harness and a child `python` all come from the release checkout."""
    assert Path(REPO).resolve() == RELEASE_ROOT, f"harness from {REPO}, package from {RELEASE_ROOT}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RELEASE_ROOT, capture_output=True, text=True).stdout
    assert head.startswith(RELEASE_COMMIT), f"{RELEASE_ROOT} is at {head.strip() or '?'}, not {RELEASE_COMMIT}"
    probe = "import llama_stack_provider_batches as p; print(p.__file__)"
    child = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    module = Path(child.stdout.strip())
    assert RELEASE_ROOT in module.parents, f"a child process imports {module}"
    print(f"release code: {module} (commit {head.strip()})")
    return head.strip()


def lines(prefix: str, count: int, model: str = MODEL) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i:04d}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"{prefix} question {i}"}]},
        }
        for i in range(count)
    ]


def create(client: OpenAI, requests: list[dict[str, Any]], key: str | None = None, **options: Any) -> Batch:
    content = "\n".join(json.dumps(line) for line in requests).encode()
    file_id = client.files.create(file=("input.jsonl", content), purpose="batch").id
    extra = {"extra_body": {"idempotency_key": key}} if key else {}
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **options, **extra
    )


def wait(client: OpenAI, batch_id: str, done: Callable[[Batch], bool], timeout: float = 90) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s: {batch.request_counts}")
        time.sleep(0.1)


def finished(batch: Batch) -> bool:
    return batch.status in {"completed", "failed", "expired", "cancelled"}


def answered(control: StandInControl) -> int:
    stats = control.stats()
    return stats["total"] - stats["in_flight"]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (the stack may run workers of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_stack(stack: ServerProcess) -> None:
    """SIGKILL the stack and anything it started, then reap it."""
    below = descendants(stack.process.pid)
    for pid in [stack.process.pid, *below]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.process.wait()
    print(f"killed stack pid {stack.process.pid} and {len(below)} descendant(s)")


def listed(client: OpenAI) -> list[Batch]:
    """A user's batches as `GET /v1/batches` pages them, newest first (small pages, to paginate)."""
    return list(client.batches.list(limit=3))


def entry(batch: Batch, key: str | None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "id": batch.id,
        "status": batch.status,
        "idempotency_key": key,
        "metadata": metadata,
        "endpoint": batch.endpoint,
        "created_at": batch.created_at,
        "request_counts": batch.request_counts.model_dump() if batch.request_counts else None,
        "input_file_id": batch.input_file_id,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "errors": [e.model_dump() for e in batch.errors.data or []] if batch.errors else [],
    }


def generate(work: Path) -> tuple[Path, dict[str, Any]]:
    """Run the scenario on a fresh state under `work`; the stack is dead when this returns."""
    commit = check_release_code()
    state = work / "state"
    made: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
    standin = start_standin(work)
    stack: ServerProcess | None = None
    try:
        control = StandInControl(standin.url)
        with auth_endpoint() as endpoint:
            run_yaml = run_yaml_with_auth(work, endpoint)
            stack = start_stack(work, state, f"{standin.url}/v1", STACK_ENV, run_yaml=run_yaml)
            warm_up(stack, headers={"Authorization": f"Bearer {USERS['alice']['token']}"})
            client = {
                name: OpenAI(base_url=f"{stack.url}/v1", api_key=user["token"], max_retries=0, timeout=60)
                for name, user in USERS.items()
            }
            alice = client["alice"]

            def run(name: str, prefix: str, count: int, key: str | None = None, **options: Any) -> Batch:
                batch = wait(client[name], create(client[name], lines(prefix, count), key, **options).id, finished)
                made[name].append(entry(batch, key, options.get("metadata")))
                return batch

            run("alice", "alice-done-1", 3)
            run("alice", "alice-done-2", 3, "upgrade-key-a", metadata={"fixture": "store-v1", "user": "alice"})
            run("alice", "alice-done-3", 3)

            control.configure(latency_mean=3)  # slow enough to cancel while it runs
            slow = create(alice, lines("alice-cancelled", 20))
            wait(alice, slow.id, lambda b: b.status == "in_progress")
            alice.batches.cancel(slow.id)
            made["alice"].append(entry(wait(alice, slow.id, finished), None))
            control.configure(latency_mean=0)

            failing = create(alice, lines("alice-failed", 3, model="local/no-such-model"))
            made["alice"].append(entry(wait(alice, failing.id, finished), None))

            run("bob", "bob-done-1", 3)
            run("bob", "bob-done-2", 2, "upgrade-key-a", metadata={"fixture": "store-v1", "user": "bob"})

            control.configure(latency_mean=0.1)
            control.reset()
            big_lines = lines("alice-unfinished", UNFINISHED_REQUESTS)
            big = create(alice, big_lines, "upgrade-key-running")
            wait_until(lambda: answered(control) >= UNFINISHED_STOP_AT, "a third of the large batch answered")
            # Freeze progress before listing: new requests hang, the ones in flight finish and are stored,
            # so the counts listed below are the counts on disk when the stack dies.
            control.configure(latency_mean=600)
            wait_until(lambda: control.stats()["in_flight"] >= WINDOW, "the window filled with hanging requests")
            time.sleep(2.5)  # counts are stored at least once a second
            before = alice.batches.retrieve(big.id).request_counts
            time.sleep(1.5)
            after = alice.batches.retrieve(big.id).request_counts
            assert before == after, f"counts still moving: {before} -> {after}"
            lists = {name: listed(client[name]) for name in USERS}
            kill_stack(stack)
            stack = None
            by_id = {b.id: b for b in lists["alice"]}
            made["alice"].append(entry(by_id[big.id], "upgrade-key-running"))
            assert by_id[big.id].status == "in_progress", by_id[big.id].status
    finally:
        if stack is not None:
            stack.stop(signal.SIGKILL)
        standin.stop(signal.SIGKILL)  # requests hang in it on purpose

    users: dict[str, Any] = {}
    for name, user in USERS.items():
        keys = {e["id"]: (e["idempotency_key"], e["metadata"]) for e in made[name]}
        order = [b.id for b in lists[name]]
        assert sorted(order) == sorted(keys), f"{name}: listed {order}, created {list(keys)}"
        users[name] = {
            **user,
            "batch_ids": order,
            "batches": [entry(b, *keys[b.id]) for b in lists[name]],
        }
    manifest = {
        "fixture": "store-v1",
        "written_by_commit": commit,
        "generated_state_dir": str(state.resolve()),
        "state_layout": ["kv.db", "sql.db", "files/"],
        "stack_env": STACK_ENV,
        "run_yaml": f"run.yaml of {RELEASE_COMMIT} plus server.auth.provider_config "
        "{type: custom, endpoint: <an endpoint answering the users below>} (tools.harness.run_yaml_with_auth)",
        "model": MODEL,
        "users": users,
        "unfinished": {
            "user": "alice",
            "batch_id": big.id,
            "idempotency_key": "upgrade-key-running",
            "total": UNFINISHED_REQUESTS,
            "request_counts_at_kill": after.model_dump(),
            "custom_ids": [line["custom_id"] for line in big_lines],
        },
    }
    return state, manifest


def pack(state: Path, manifest: dict[str, Any], tarball: Path) -> None:
    """`state/` (with any SQLite -wal file the kill left) and `manifest.json` into a gzipped tar."""
    with tarfile.open(tarball, "w:gz", compresslevel=9) as archive:
        archive.add(state, arcname="state", filter=lambda info: None if info.name.endswith("-shm") else info)
        data = json.dumps(manifest, indent=2).encode() + b"\n"
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "store-v1.tar.gz")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="store-v1-"))
    try:
        state, manifest = generate(work)
        snapshot = work / "snapshot"
        shutil.copytree(state, snapshot / "state")  # copied while no server has it open
        pack(snapshot / "state", manifest, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes); work directory {work}")
        for name, user in manifest["users"].items():
            print(name, [(b["id"], b["status"], b["request_counts"]) for b in user["batches"]])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
