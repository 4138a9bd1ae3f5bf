"""Processes: one large batch at zero model latency on one stack worker against two (run.yaml with
`server.workers`, SQLite as shipped), and on one replica against three (run-replicas.yaml over
PostgreSQL on 127.0.0.1:5432, the batch created through the first replica), side by side.

    .venv/bin/python bench/processes.py                       # workers1, workers2, replicas1, replicas3
    .venv/bin/python bench/processes.py --configs workers1,workers2 --requests 5000 --json out.json

Every configuration starts on fresh state (its own state directory, or its own batches table, kvstore
namespace and files directory in PostgreSQL) and is warmed up before the batch is created. The batch
is split into shards of --requests-per-shard requests that any process with a free slot runs, each
with --window requests in flight. Figures per configuration:

    seconds           from `batches.create` to the first poll (every 0.1 s) that sees `completed`
    req/s             requests completed / seconds
    ids once          request_counts.completed == N, and the output file has N lines whose custom_ids
                      are exactly the input's, each once
    per process       every process that runs batch work: each uvicorn worker (`worker_pids`), or the
                      only process of a one-worker stack, or each replica's process
      CPU s           utime + stime from /proc/<pid>/stat (all its threads), from create to completed
      shards          shard runs it finished ("Shard run ended ... stop=done" in the stack's log)
      shares          percent of its py-spy samples in each category below

Profiles: `py-spy record --pid P --format raw --rate R --nonblocking --full-filenames` on each such
process, started --profile-delay seconds after the batch is created and stopped (SIGINT) after
--profile-seconds or when the batch ends (0: profile until the batch ends). A window rather than the
whole batch because sampling slows the stack down (about 1.5x at 100 Hz on a 2-core machine), and
the seconds above include that slowdown for the length of the window. py-spy leaves idle threads
out, so shares are of on-CPU thread samples, every thread counted (aiosqlite's threads, the default
executor's). When py-spy cannot attach, shares are left empty with the reason and CPU s are still
reported.

Classifying a sample: walk its stack from the leaf (innermost frame) towards the root; the first frame
whose file path contains one of a category's markers decides. Frames of unlisted code (asyncio, anyio,
pydantic, json, typing...) therefore count for their nearest categorised caller: pydantic validating
a request inside the inference router counts as routing, h11 parsing inside httpcore as HTTP client.

    provider   /llama_stack_provider_batches/
    sql        /sqlalchemy/ /aiosqlite/ /asyncpg/ /psycopg2/ /sqlite3/, and the stack's store
               wrappers /llama_stack/core/storage/ (so registry lookups the router makes through the
               kvstore count here, not as routing)
    http       /openai/ /httpx/ /httpx2/ /httpcore/ /httpcore2/, and anyio's /anyio/_core/_sockets.py
               (connect_tcp, which httpcore's anyio backend runs in tasks of its own, outside any
               httpcore frame)
    routing    the stack between an API call and the HTTP client: /llama_stack/core/ (server, routers,
               routing tables, registry, request context, access control) and /llama_stack/providers/
               (the remote::openai inference adapter, the localfs files provider); also /fastapi/ and
               /starlette/ (serving the stack's own API). Not /llama_stack/cli/ nor /uvicorn/, which
               sit at the root of every event-loop sample.
    other      none of the above: the event loop itself (selectors, callbacks), idle-looking executor
               threads, samples without Python frames

    own        not a category but the provider's own share: its samples (provider) and the SQL samples
               whose stack passes through its storage modules (its database writes and reads)
"""

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openai import OpenAI
from openai.types import Batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.harness import (
    REPLICAS_RUN_YAML,
    ServerProcess,
    StandInControl,
    cpu_seconds,
    fresh_replica_set_env,
    run_yaml_with_workers,
    server_up,
    start_stack,
    start_standin,
    stop_stack_and_workers,
    wait_for_workers,
    warm_up,
    worker_pids,
)

PY_SPY = Path(sys.executable).parent / "py-spy"
TERMINAL = ("completed", "failed", "expired", "cancelled")
CATEGORIES = ("provider", "routing", "http", "sql", "other")
# Not a category: the provider's own share, its code and the SQL its storage runs (`own` below).
OWN_SQL_MARKER = "/llama_stack_provider_batches/storage/"
# Checked in this order for each frame; only /llama_stack/core/storage/ (sql) also matches a later rule.
MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("provider", ("/llama_stack_provider_batches/",)),
    ("sql", ("/sqlalchemy/", "/aiosqlite/", "/asyncpg/", "/psycopg2/", "/sqlite3/", "/llama_stack/core/storage/")),
    ("http", ("/openai/", "/httpx/", "/httpx2/", "/httpcore/", "/httpcore2/", "/anyio/_core/_sockets.py")),
    ("routing", ("/llama_stack/core/", "/llama_stack/providers/", "/fastapi/", "/starlette/")),
)
CONFIG_NAME = re.compile(r"(workers|replicas)(\d+)")


@dataclass
class ProcessFigures:
    role: str  # "worker" or "replica"
    pid: int
    cpu_seconds: float = 0.0
    shards: int = 0
    samples: int = 0
    shares: dict[str, float] = field(default_factory=dict)  # category -> percent of samples
    profile_error: str | None = None


@dataclass
class Outcome:
    config: str
    requests: int
    window: int
    requests_per_shard: int
    status: str = ""
    seconds: float = 0.0
    requests_per_second: float = 0.0
    completed: int = 0
    failed: int = 0
    output_lines: int = 0
    all_custom_ids_once: bool = False
    processes: list[ProcessFigures] = field(default_factory=list)
    supervisor_cpu_seconds: float | None = None  # the uvicorn supervisor of a several-worker stack
    standin_cpu_seconds: float = 0.0
    profile_window_seconds: list[float] = field(default_factory=list)  # [start, end] after create
    notes: list[str] = field(default_factory=list)


def frame_path(frame: str) -> str:
    """The file of a raw py-spy frame, `function (path:line)`."""
    opening = frame.rfind(" (")
    return frame[opening + 2 : -1].rsplit(":", 1)[0] if opening >= 0 else ""


def classify(frames: list[str]) -> str:
    """The category of a sample: that of the frame nearest the leaf that has one (see the docstring)."""
    for frame in reversed(frames):
        path = frame_path(frame)
        for category, markers in MARKERS:
            if any(marker in path for marker in markers):
                return category
    return "other"


def category_samples(raw: Path) -> Counter[str]:
    """Samples per category in a py-spy raw file: a line per distinct stack, `f1;f2;...;leaf count`;
    also `own`: the provider's samples and the SQL samples under its storage modules."""
    counts: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            frames = stack.split(";") if stack else []
            category = classify(frames)
            counts[category] += int(count)
            if category == "provider" or (category == "sql" and any(OWN_SQL_MARKER in f for f in frames)):
                counts["own"] += int(count)
    return counts


class Profiler:
    """py-spy recording one process into a raw file until stopped."""

    def __init__(self, pid: int, output: Path, rate: int, seconds: float, gil_only: bool = False) -> None:
        self.pid = pid
        self.output = output
        self.log = output.with_suffix(".log")
        command = [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate)]
        command += ["--output", str(output), "--nonblocking", "--full-filenames"]
        if seconds > 0:
            command += ["--duration", f"{seconds:g}"]
        if gil_only:  # only the thread holding the GIL: Python's CPU, without threads waiting for it
            command += ["--gil"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> tuple[Counter[str] | None, str | None]:
        """End the recording (py-spy writes its file on SIGINT): the samples per category, or why none."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.output.exists():
            lines = self.log.read_text(errors="replace").strip().splitlines()
            return None, f"py-spy wrote no profile (exit {self.process.returncode}): {lines[0] if lines else ''}"
        return category_samples(self.output), None


def input_lines(requests: int) -> tuple[bytes, list[str]]:
    """A JSONL of chat requests with prompts unique to this call, and its custom_ids."""
    tag = uuid.uuid4().hex[:8]
    ids = [f"r{n}" for n in range(requests)]
    rows = [
        json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "local/m-chat", "messages": [{"role": "user", "content": f"{tag} question {n}"}]},
            }
        )
        for n, custom_id in enumerate(ids)
    ]
    return ("\n".join(rows) + "\n").encode(), ids


def batch_processes(kind: str, servers: list[ServerProcess]) -> list[tuple[str, int]]:
    """(role, pid) of each process that runs batch work."""
    if kind == "replicas":
        return [("replica", server.process.pid) for server in servers]
    pids = worker_pids(servers[0])
    return [("worker", pid) for pid in pids] if pids else [("worker", servers[0].process.pid)]


def check_output(client: OpenAI, batch: Batch, ids: list[str]) -> tuple[int, bool]:
    """(output lines, whether they hold every custom_id of the input exactly once)."""
    if not batch.output_file_id:
        return 0, False
    text = client.files.content(batch.output_file_id).text
    seen = [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
    return len(seen), len(seen) == len(set(seen)) == len(ids) and set(seen) == set(ids)


class ProfileWindow:
    """py-spy on each batch process from `delay` seconds after create, for `seconds` (0: to the end)."""

    def __init__(self, outcome: Outcome, args: argparse.Namespace) -> None:
        self.outcome = outcome
        self.args = args
        self.until = args.profile_delay + args.profile_seconds if args.profile_seconds > 0 else float("inf")
        self.profilers: list[Profiler] = []
        self.running = False

    def tick(self, elapsed: float) -> None:
        """Start or stop the profilers when due; `elapsed` is seconds since create."""
        if self.args.profile and not self.profilers and elapsed >= self.args.profile_delay:
            for process in self.outcome.processes:
                output = self.args.work_dir / f"{self.outcome.config}-{process.pid}.raw"
                profiler = Profiler(process.pid, output, self.args.rate, self.args.profile_seconds, self.args.gil)
                self.profilers.append(profiler)
            self.running = True
            self.outcome.profile_window_seconds = [round(elapsed, 1)]
        elif self.running and elapsed >= self.until:
            self.finish(elapsed)

    def finish(self, elapsed: float) -> None:
        """Stop the profilers if they run, and turn their samples into each process's shares."""
        if not self.running:
            return
        self.running = False
        self.outcome.profile_window_seconds.append(round(elapsed, 1))
        for profiler, process in zip(self.profilers, self.outcome.processes, strict=True):
            counts, process.profile_error = profiler.stop()
            if counts is not None and not counts:
                process.profile_error = "py-spy recorded no samples"
            elif counts:
                process.samples = sum(counts[c] for c in CATEGORIES)
                process.shares = {c: round(100 * counts[c] / process.samples, 1) for c in (*CATEGORIES, "own")}


def run_batch(
    outcome: Outcome, servers: list[ServerProcess], kind: str, standin: ServerProcess, args: argparse.Namespace
) -> None:
    """Create the batch through the first server, profile while it runs, and fill in `outcome`."""
    client = OpenAI(base_url=f"{servers[0].url}/v1", api_key="none", max_retries=2, timeout=600)
    content, ids = input_lines(args.requests)
    file_id = client.files.create(file=("bench.jsonl", content), purpose="batch").id
    del content
    outcome.processes = [ProcessFigures(role, pid) for role, pid in batch_processes(kind, servers)]
    supervisor = servers[0].process.pid if kind == "workers" and len(outcome.processes) > 1 else None
    watched = [p.pid for p in outcome.processes] + ([supervisor] if supervisor else []) + [standin.process.pid]
    cpu_before = {pid: cpu_seconds(pid) for pid in watched}

    window = ProfileWindow(outcome, args)
    started = time.perf_counter()
    try:
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        while batch.status not in TERMINAL and time.perf_counter() - started < args.timeout:
            time.sleep(0.1)
            window.tick(time.perf_counter() - started)
            batch = client.batches.retrieve(batch.id)
        outcome.seconds = round(time.perf_counter() - started, 2)
        cpu_after = {pid: cpu_seconds(pid) for pid in watched}
    finally:
        window.finish(time.perf_counter() - started)
    if args.profile and not window.profilers:
        outcome.notes.append(f"the batch ended within {args.profile_delay:g} s: no profile")

    outcome.status = batch.status
    if batch.status not in TERMINAL:
        outcome.notes.append(f"still {batch.status} after {args.timeout:g} s")
    if batch.request_counts:
        outcome.completed, outcome.failed = batch.request_counts.completed, batch.request_counts.failed
    outcome.requests_per_second = round(outcome.completed / outcome.seconds, 1) if outcome.seconds else 0.0
    outcome.output_lines, ids_once = check_output(client, batch, ids)
    outcome.all_custom_ids_once = ids_once and outcome.completed == args.requests
    for process in outcome.processes:
        process.cpu_seconds = round(cpu_after[process.pid] - cpu_before[process.pid], 1)
    if supervisor:
        outcome.supervisor_cpu_seconds = round(cpu_after[supervisor] - cpu_before[supervisor], 1)
    outcome.standin_cpu_seconds = round(cpu_after[standin.process.pid] - cpu_before[standin.process.pid], 1)
    finished: Counter[int] = Counter()
    for server in servers:
        finished.update(int(run["process"]) for run in server.shard_runs(batch.id) if run["stop"] == "done")
    for process in outcome.processes:
        process.shards = finished[process.pid]


def parse_config(name: str) -> tuple[str, int]:
    """("workers" or "replicas", how many) from a name such as workers2."""
    match = CONFIG_NAME.fullmatch(name)
    if match is None or int(match.group(2)) < 1:
        raise SystemExit(f"unknown configuration {name!r}: workers<N> or replicas<N>")
    return match.group(1), int(match.group(2))


def run_config(name: str, standin: ServerProcess, args: argparse.Namespace) -> Outcome:
    """One configuration on fresh state: start it, run the batch, stop every process it started."""
    kind, count = parse_config(name)
    outcome = Outcome(name, args.requests, args.window, args.requests_per_shard)
    directory = args.work_dir / f"{name}-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    settings = {
        "BATCHES_MAX_CONCURRENT_REQUESTS": str(args.window),
        "BATCHES_REQUESTS_PER_SHARD": str(args.requests_per_shard),
    }
    model_url = f"{standin.url}/v1"
    servers: list[ServerProcess] = []
    try:
        if kind == "workers":
            run_yaml = run_yaml_with_workers(directory, count)
            servers.append(start_stack(args.work_dir, directory / "state", model_url, settings, run_yaml=run_yaml))
            if count > 1:
                wait_for_workers(servers[0], count)
        else:
            env = fresh_replica_set_env(directory, **settings)
            for n in range(count):
                state = directory / f"replica-{n}"
                servers.append(start_stack(args.work_dir, state, model_url, env, run_yaml=REPLICAS_RUN_YAML))
        for server in servers:
            warm_up(server)
        run_batch(outcome, servers, kind, standin, args)
    finally:
        for server in servers:
            stop_stack_and_workers(server)
    return outcome


def print_table(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    print(
        f"\n{args.requests} chat requests at zero model latency, window {args.window}, "
        f"{args.requests_per_shard} requests per shard, one batch"
    )
    if args.profile:
        span = f"for {args.profile_seconds:g} s" if args.profile_seconds > 0 else "until the batch ends"
        print(f"py-spy at {args.rate} Hz from {args.profile_delay:g} s after create {span}; shares in % of samples")
    head = f"{'configuration':<14}{'seconds':>9}{'req/s':>8}{'ids once':>9}  {'process':<16}{'CPU s':>7}{'shards':>7}"
    print(head + "".join(f"{c:>9}" for c in (*CATEGORIES, "own")) + f"{'samples':>9}")
    for outcome in outcomes:
        first = f"{outcome.config:<14}{outcome.seconds:>9}{outcome.requests_per_second:>8}"
        first += f"{'yes' if outcome.all_custom_ids_once else 'NO':>9}"
        for n, process in enumerate(outcome.processes):
            row = (first if n == 0 else " " * len(first)) + f"  {process.role + ' ' + str(process.pid):<16}"
            row += f"{process.cpu_seconds:>7}{process.shards:>7}"
            if process.shares:
                row += "".join(f"{process.shares[c]:>9}" for c in (*CATEGORIES, "own")) + f"{process.samples:>9}"
            elif process.profile_error:
                row += f"  {process.profile_error}"
            print(row)
        extra = [f"stand-in CPU s {outcome.standin_cpu_seconds}"]
        if outcome.supervisor_cpu_seconds is not None:
            extra.append(f"supervisor CPU s {outcome.supervisor_cpu_seconds}")
        if outcome.status != "completed":
            extra.append(f"status {outcome.status}, completed {outcome.completed}, failed {outcome.failed}")
        print(" " * 16 + "; ".join(extra + outcome.notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="workers1,workers2,replicas1,replicas3")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=32, help="BATCHES_MAX_CONCURRENT_REQUESTS")
    parser.add_argument("--requests-per-shard", type=int, default=250, help="BATCHES_REQUESTS_PER_SHARD")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--profile-delay", type=float, default=5.0, help="seconds after create to start py-spy")
    parser.add_argument("--profile-seconds", type=float, default=20.0, help="how long to profile; 0: to the end")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="CPU seconds only, no py-spy")
    parser.add_argument(
        "--gil", action="store_true", help="sample only the thread holding the GIL (py-spy --gil): no waiting threads"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on a batch after this many seconds")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    configs = args.configs.split(",")
    for name in configs:
        parse_config(name)
    if args.profile and not PY_SPY.exists():
        print(f"no {PY_SPY}: `pip install -e '.[bench]'` for profiles; measuring without them", flush=True)
        args.profile = False
    if any(name.startswith("replicas") for name in configs) and not server_up(5432):
        raise SystemExit("the replicas configurations need PostgreSQL on 127.0.0.1:5432")

    args.work_dir = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    standin = start_standin(args.work_dir)
    outcomes: list[Outcome] = []
    try:
        StandInControl(standin.url).configure(latency_mean=0, latency_sigma=0, fail_503=0, fail_429=0)
        for name in configs:
            print(f"running {name}...", flush=True)
            outcomes.append(run_config(name, standin, args))
            print(f"  {asdict(outcomes[-1])}", flush=True)
    finally:
        standin.stop()
    print_table(outcomes, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(outcome) for outcome in outcomes], indent=2))
    print(f"\nlogs and profiles: {args.work_dir}")


if __name__ == "__main__":
    main()
