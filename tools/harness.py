"""Starting and stopping the real processes that integration tests and benchmarks talk to: the
stand-in model server and `llama stack run`."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from tools.tiktoken_cache import ensure_cache

REPO = Path(__file__).resolve().parents[1]
STANDIN_SCRIPT = REPO / "tools" / "standin_model_server.py"
LLAMA = Path(sys.executable).parent / "llama"
OGX = Path(sys.executable).parent / "ogx"
# Which stack this environment has: llama-stack 0.7 (`llama stack run`), or OGX 1.x (`ogx run`).
ON_OGX = OGX.exists() and not LLAMA.exists()
RUN_YAML = REPO / ("run-ogx.yaml" if ON_OGX else "run.yaml")
REPLICAS_RUN_YAML = REPO / "run-replicas.yaml"  # several replicas over PostgreSQL and a shared files directory
OTEL_INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"


def server_up(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port (PostgreSQL, Redis...)."""
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started by the tests, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s:\n{self.log_tail()}")

    def wait_for_record(self, *containing: str, timeout: float = 10) -> str:
        """The first log record holding every one of `containing`, once it is written: a server logs
        some events just after the change a client sees (a batch's end, say)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.log_records(containing[0]) if all(text in r for text in containing)]
            if found or time.monotonic() > deadline:
                assert found, f"no log record with {containing} in {timeout} s"
                return found[0]
            time.sleep(0.05)

    def log_records(self, containing: str) -> list[str]:
        """The log records (one per event, its wrapped lines joined) that contain `containing`."""
        records: list[str] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line[:1].isalpha() and line.split(" ", 1)[0].isupper():  # "INFO     2026-...": a new record
                records.append(line.strip())
            elif records:
                records[-1] += " " + line.strip()
        return [record for record in records if containing in record]

    def shard_runs(self, batch_id: str, since: str = "") -> list[dict[str, str]]:
        """The shard runs of a batch this server logged: their fields (shard, stop, process...).

        OGX's log redacts batch ids: there, every shard run logged at `since` (an ISO time) or later
        counts, so a test that runs one batch at a time passes the time it started it.
        """
        runs = []
        for record in self.log_records("Shard run ended"):
            fields = dict(pair.split("=", 1) for pair in record.split() if "=" in pair)
            logged_at = record.split()[1] if len(record.split()) > 1 else ""
            redacted = fields.get("batch_id") == "<REDACTED>" and since and logged_at >= since
            if fields.get("batch_id") == batch_id or redacted:
                runs.append(fields)
        return runs

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _spawn(name: str, command: list[str], log_path: Path, url: str, env: dict[str, str]) -> ServerProcess:
    log = log_path.open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO)
    return ServerProcess(name, process, url, log_path)


def start_standin(log_dir: Path, **behaviour: Any) -> ServerProcess:
    """The stand-in model server on a free port; `behaviour` as its command-line options."""
    port = free_port()
    options = [f"--{name.replace('_', '-')}={value}" for name, value in behaviour.items()]
    command = [sys.executable, str(STANDIN_SCRIPT), "--port", str(port), *options]
    server = _spawn("stand-in", command, log_dir / "standin.log", f"http://127.0.0.1:{port}", {})
    server.wait_healthy("/health", timeout=30)
    return server


POSTGRES_SQL_BACKEND = "{type: sql_postgres, host: 127.0.0.1, port: 5432, db: test, user: postgres}"


def run_yaml_with_sql_store(directory: Path, backend: str) -> Path:
    """A copy of run.yaml whose batches live in PostgreSQL on 127.0.0.1 (a table of their own), or
    run.yaml itself for "sqlite" (the stack's sql_default)."""
    if backend == "sqlite":
        return RUN_YAML
    table = f"batches_{uuid.uuid4().hex[:10]}"
    lines: list[str] = []
    for line in RUN_YAML.read_text().splitlines():
        lines.append(line)
        if line.strip().startswith("kvstore:") and "namespace" in line:
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(f"{indent}sql_store: {{backend: sql_batches, table_name: {table}}}")
        if line.strip().startswith("sql_default:"):
            lines.append(f"    sql_batches: {POSTGRES_SQL_BACKEND}")
    path = directory / f"run-{table}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def replicas_run_yaml_with_sql_apart(directory: Path) -> Path:
    """run-replicas.yaml with its SQL stores (this provider's, the files' metadata) on POSTGRES_PORT
    and the stack's kvstore (the model registry) and inference store on POSTGRES_KV_PORT: with the
    first behind a proxy that cuts a replica off (tcp_proxy.py), the replica could still send
    requests, and only back-pressure from the results it cannot store stops it."""
    text = REPLICAS_RUN_YAML.read_text()
    kvstore = 'kv_postgres, host: "${env.POSTGRES_HOST:=127.0.0.1}", port: "${env.POSTGRES_PORT:=5432}"'
    inference_store = "inference: {backend: sql_default, table_name: inference_store}"
    assert kvstore in text and inference_store in text
    text = text.replace(kvstore, 'kv_postgres, host: 127.0.0.1, port: "${env.POSTGRES_KV_PORT}"')
    text = text.replace(inference_store, "inference: {backend: sql_direct, table_name: inference_store}")
    direct = (
        'sql_direct: {type: sql_postgres, host: 127.0.0.1, port: "${env.POSTGRES_KV_PORT}", db: test, user: postgres}'
    )
    path = directory / "run-replicas-proxied.yaml"
    path.write_text(text.replace("  stores:\n", f"    {direct}\n  stores:\n"))
    return path


def fresh_replica_set_env(directory: Path, **settings: str) -> dict[str, str]:
    """Environment for a new set of replicas from run-replicas.yaml: its own files directory under
    `directory`, its own batches table and kvstore namespace in the shared PostgreSQL, and `settings`."""
    tag = uuid.uuid4().hex[:10]
    return {
        "SHARED_DIR": str(directory / f"shared-{tag}"),
        "BATCHES_SQL_TABLE": f"batches_{tag}",
        "BATCHES_KV_NAMESPACE": f"batches-{tag}",
        **settings,
    }


@contextmanager
def token_endpoint(users: dict[str, dict[str, Any]]) -> Iterator[str]:
    """An endpoint for the stack's `custom` auth provider, on a free port while in use: it answers
    each token of `users` with its user ({"principal", "attributes"}), and any other with 401."""

    class TokenToUser(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = users.get(body.get("api_key"))
            self.send_response(200 if user else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(user or {"error": "unknown token"}).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenToUser)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/auth"
    finally:
        server.shutdown()


def _run_yaml_copy(base: Path, path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Write to `path` a copy of run.yaml `base` changed by `change` (comments are not kept)."""
    config = yaml.safe_load(base.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_yaml_with_auth(directory: Path, auth_endpoint: str, route_policy: str = "", base: Path = RUN_YAML) -> Path:
    """A copy of a run.yaml that authenticates callers with the stack's `custom` provider at `auth_endpoint`,
    with `route_policy` (YAML list items indented for `server.auth.route_policy`) if given."""

    def add_auth(config: dict[str, Any]) -> None:
        auth: dict[str, Any] = {"provider_config": {"type": "custom", "endpoint": auth_endpoint}}
        if route_policy:
            auth["route_policy"] = yaml.safe_load(route_policy)
        config.setdefault("server", {})["auth"] = auth

    return _run_yaml_copy(base, directory / f"{base.stem}-auth.yaml", add_auth)


def stack_command(run_yaml: Path, port: int) -> list[str]:
    """The command serving `run_yaml` on `port` with this environment's stack."""
    if ON_OGX:  # OGX refuses plain HTTP unless told: these servers listen on 127.0.0.1 only
        return [str(OGX), "run", str(run_yaml), "--port", str(port), "--insecure"]
    return [str(LLAMA), "stack", "run", str(run_yaml), "--port", str(port)]


def start_stack(
    log_dir: Path,
    state_dir: Path,
    model_url: str,
    env: dict[str, str] | None = None,
    run_yaml: Path = RUN_YAML,
    launcher: tuple[str, ...] = (),
) -> ServerProcess:
    """`llama stack run <run_yaml>` on a free port with its state under `state_dir`, started through
    `launcher` if given (`opentelemetry-instrument`, say)."""
    port = free_port()
    command = [*launcher, *stack_command(run_yaml, port)]
    variables = {"STATE_DIR": str(state_dir), "MODEL_URL": model_url, **(env or {})}
    if not (variables.get("TIKTOKEN_CACHE_DIR") or os.environ.get("TIKTOKEN_CACHE_DIR")):
        variables["TIKTOKEN_CACHE_DIR"] = str(ensure_cache())
    server = _spawn("llama stack", command, log_dir / f"stack-{port}.log", f"http://127.0.0.1:{port}", variables)
    server.wait_healthy("/v1/health", timeout=120)
    return server


def warm_up(stack: ServerProcess, attempts: int = 5, headers: dict[str, str] | None = None) -> None:
    """Make the stack create its SQLite tables (inference store, files) before a test leans on them.

    The stack creates each table lazily on first use; concurrent first uses right after start-up
    fail ("no such table", "database is locked"). One sequential use of each avoids that.
    """
    for attempt in range(attempts):
        try:
            chat = {"model": "local/m-chat", "messages": [{"role": "user", "content": "warm up"}]}
            httpx.post(f"{stack.url}/v1/chat/completions", json=chat, headers=headers, timeout=30).raise_for_status()
            httpx.get(f"{stack.url}/v1/files", headers=headers, timeout=30).raise_for_status()
            return
        except httpx.HTTPError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


class StandInControl:
    """The stand-in's admin endpoints: counters and behaviour."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stats(self, latencies: bool = False) -> dict[str, Any]:
        params = {"latencies": "1"} if latencies else {}
        return httpx.get(f"{self.url}/admin/stats", params=params, timeout=10).json()

    def reset(self, seed: int | None = None) -> None:
        """Clear the counters; with `seed`, restart the latency draws from it."""
        body = {"seed": seed} if seed is not None else None
        httpx.post(f"{self.url}/admin/reset", json=body, timeout=10).raise_for_status()

    def configure(self, **behaviour: float) -> None:
        httpx.post(f"{self.url}/admin/config", json=behaviour, timeout=10).raise_for_status()


# The stack's default rules written out, for a test's access policy to add its own rules before
# them: owners, their teams, and what nobody owns (as the models of run.yaml).
OWNER_RULES = (
    "    - permit: {actions: [create, read, update, delete]}\n"
    "      when: user is owner\n"
    "    - permit: {actions: [create, read, update, delete]}\n"
    "      when: user in owners teams\n"
    "    - permit: {actions: [create, read, update, delete]}\n"
    "      when: resource is unowned\n"
)


def run_yaml_with_access_policy(directory: Path, auth_endpoint: str, access_policy: str, base: Path = RUN_YAML) -> Path:
    """A copy of a run.yaml with authentication as `run_yaml_with_auth` and `access_policy` (YAML list
    items indented for `server.auth.access_policy`), in a directory of its own so that it never
    overwrites the file `run_yaml_with_auth` writes for other tests."""
    own_directory = directory / "access-policy"
    own_directory.mkdir(exist_ok=True)
    path = run_yaml_with_auth(own_directory, auth_endpoint, base=base)

    def add_policy(config: dict[str, Any]) -> None:
        config["server"]["auth"]["access_policy"] = yaml.safe_load(access_policy)

    return _run_yaml_copy(path, path, add_policy)


def run_yaml_without(directory: Path, apis: set[str], base: Path = RUN_YAML) -> Path:
    """A copy of a run.yaml whose stack does not serve `apis` (their providers and resources dropped too).

    Only these APIs' own sections are dropped: a stack without `responses` still has what the Responses
    provider needed (vector_io, tool_runtime), so nothing else changes.
    """
    config = yaml.safe_load(base.read_text())
    config["apis"] = [api for api in config["apis"] if api not in apis]
    for api in apis:
        config["providers"].pop(api, None)
        config.pop(api, None)  # e.g. `safety: {default_shield_id: ...}`
    if "safety" in apis:
        config.get("registered_resources", {}).pop("shields", None)
    path = directory / f"{base.stem}-without-{'-'.join(sorted(apis))}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_yaml_with_operator_webhooks(directory: Path, endpoints: list[dict[str, Any]], base: Path = RUN_YAML) -> Path:
    """A copy of a run.yaml whose batches provider sends every batch's events to the operator's
    `endpoints` (`webhooks.endpoints`: url, secret, event_types)."""

    def add_endpoints(config: dict[str, Any]) -> None:
        [batches] = config["providers"]["batches"]
        batches["config"]["webhooks"]["endpoints"] = endpoints

    return _run_yaml_copy(base, directory / f"{base.stem}-operator-webhooks.yaml", add_endpoints)


def run_yaml_with_workers(directory: Path, workers: int, base: Path = RUN_YAML) -> Path:
    """A copy of a run.yaml whose server runs `workers` uvicorn worker processes (`server.workers`), each
    building its own providers over the same stores."""

    def set_workers(config: dict[str, Any]) -> None:
        config.setdefault("server", {})["workers"] = workers

    return _run_yaml_copy(base, directory / f"{base.stem}-workers-{workers}.yaml", set_workers)


def _proc_stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat (state, ppid, ...), past the command name in parentheses."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def worker_pids(stack: ServerProcess) -> list[int]:
    """The uvicorn worker processes of a stack started with `server.workers` above 1, sorted.

    `llama stack run` runs uvicorn's supervisor, which starts each worker with multiprocessing's
    `spawn` (a child whose command line runs `spawn_main`) and restarts a worker that dies; its other
    child, multiprocessing's resource tracker, is left out. Read from /proc, so Linux only."""
    parent = stack.process.pid
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_proc_stat_fields(int(entry.name))[1]) != parent:
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if b"spawn_main" in command:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_for_workers(stack: ServerProcess, count: int, timeout: float = 120) -> list[int]:
    """The stack's worker pids once `count` of them run and the stack answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(stack)
        # Every worker serves once it says so (a loaded machine may start one long after the other).
        if len(pids) == count and len(stack.log_records("Application startup complete")) >= count:
            stack.wait_healthy("/v1/health", timeout=max(1.0, deadline - time.monotonic()))
            return pids
        if stack.process.poll() is not None:
            raise RuntimeError(f"{stack.name} exited with {stack.process.returncode}:\n{stack.log_tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"{stack.name} has workers {worker_pids(stack)}, not {count}, after {timeout} s")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = _proc_stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connections_to_port(pid: int, port: int) -> int:
    """How many established TCP connections process `pid` holds to a local or remote `port` (such as
    the stand-in's port, to tell which worker is sending a batch's requests). Read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            columns = row.split()
            ports = {int(address.rsplit(":", 1)[1], 16) for address in columns[1:3]}
            if columns[3] == "01" and port in ports and columns[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def stop_stack_and_workers(stack: ServerProcess, timeout: float = 20) -> None:
    """Stop a stack started with several workers, and SIGKILL any worker left behind (a worker outlives
    its supervisor when the supervisor is killed or does not stop in time)."""
    workers = worker_pids(stack) if stack.process.poll() is None else []
    stack.stop(timeout=timeout)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # it stopped with its supervisor
