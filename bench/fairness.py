"""Fairness and responsiveness: what one large batch does to other users of the same stack, once with
this provider ("ours") and once with llama-stack's built-in `inline::reference` ("builtin"), side by side.

    .venv/bin/python bench/fairness.py                       # both scenarios, both providers
    .venv/bin/python bench/fairness.py --quick               # smaller sizes, a smoke check (~2 min)
    .venv/bin/python bench/fairness.py --scenarios fair --providers builtin --out results.json

Scenarios (requests go to the stand-in model server, started here; sizes in brackets are --quick's):

    fair         Two users with authentication on and disjoint attributes (neither sees the other's
                 batches); the stand-in answers in 100 ms; max_concurrent_requests_per_batch 10.
                 First alice alone: a 3,000 [600] request chat batch, from create to `completed`.
                 Then, on a fresh stack, alice creates the same batch and bob a 10-request one 2 s
                 later. For bob: seconds from his create to `in_progress`, to his first result
                 (request_counts.completed > 0, "start") and to `completed`; for alice: create to
                 `completed`, and her slowdown (with bob / alone). Batches are polled every 0.15 s
                 with each user's own token.
    interactive  No authentication; the stand-in answers at once; max_concurrent_requests_per_batch 32.
                 For 10 [5] s the idle stack gets GET /v1/health every 50 ms and a one-line chat
                 completion every 200 ms (two threads over plain HTTP). Then a 50,000 [5,000] request
                 batch is created; once it is `in_progress` with a first result, the same probes run
                 for 40 [10] s. Reported: p50/p99/max latency of each probe, idle and during the batch,
                 the batch's requests per second over the probing window (from request_counts, which
                 this provider updates about once a second), and how the batch's cancel ended.

Each run (provider, scenario, and each of fair's two steps) gets a fresh stack and state directory,
all under one temporary directory whose path is printed at the end with the servers' logs. The
built-in provider keeps its defaults (one batch at a time) apart from the request window; this
provider runs with run.yaml as shipped, changed by OURS_CONFIG below (batches side by side). Every
wait has a timeout: a batch that overruns it, or a stack that stops answering, is recorded in the
run's notes rather than waited for.
"""

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from openai import OpenAI
from openai.types import Batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compare import builtin_run_yaml, percentile
from tools.harness import (
    RUN_YAML,
    ServerProcess,
    run_yaml_with_auth,
    start_stack,
    start_standin,
    token_endpoint,
    warm_up,
)

# Changes to each provider's batches config (this provider: run.yaml as shipped; the built-in:
# bench.compare.builtin_run_yaml), made before each scenario's request window. None removes the
# setting, so that the provider's own default applies.
OURS_CONFIG: dict[str, Any] = {
    "max_concurrent_batches": None,  # unset: batches run side by side
    "capacity_per_model": None,  # requests in flight per model: the provider's default
}
BUILTIN_CONFIG: dict[str, Any] = {
    "max_concurrent_batches": None,  # the built-in's default: one batch at a time
}
USERS = {  # disjoint attributes: under the stack's default policy neither sees the other's batches
    "alice-token": {"principal": "alice", "attributes": {"teams": ["red"]}},
    "bob-token": {"principal": "bob", "attributes": {"teams": ["blue"]}},
}
PROVIDERS = ("ours", "builtin")
TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_SECONDS = 0.15


@dataclass(frozen=True)
class Sizes:
    """Workload sizes and timeouts; QUICK_SIZES scales them down for a smoke check."""

    alice_requests: int = 3000
    bob_requests: int = 10
    bob_delay_seconds: float = 2.0
    fair_latency_seconds: float = 0.1
    fair_window: int = 10
    batch_timeout_seconds: float = 300.0  # for any one batch to finish, or to show a first result
    interactive_requests: int = 50_000
    interactive_window: int = 32
    idle_seconds: float = 10.0
    busy_seconds: float = 40.0
    cancel_timeout_seconds: float = 90.0


DEFAULT_SIZES = Sizes()
QUICK_SIZES = replace(
    DEFAULT_SIZES,
    alice_requests=600,
    batch_timeout_seconds=120.0,
    interactive_requests=5000,
    idle_seconds=5.0,
    busy_seconds=10.0,
)


@dataclass
class Timeline:
    """What polling one batch saw, in seconds from just before its create call."""

    status: str = ""
    in_progress: float | None = None  # first poll past `validating`
    first_result: float | None = None  # first poll with request_counts.completed > 0
    ended: float | None = None  # first poll in a terminal status
    completed: int = 0
    failed: int = 0
    retrieve_errors: int = 0

    def observe(self, batch: Batch, seconds: float) -> None:
        self.status = batch.status
        if batch.request_counts:
            self.completed, self.failed = batch.request_counts.completed, batch.request_counts.failed
        if self.in_progress is None and batch.status != "validating":
            self.in_progress = round(seconds, 2)
        if self.first_result is None and (self.completed > 0 or batch.status in TERMINAL):
            self.first_result = round(seconds, 2)
        if self.ended is None and batch.status in TERMINAL:
            self.ended = round(seconds, 2)


@dataclass
class Latency:
    """Latencies of one probe, in milliseconds."""

    samples: int
    errors: int  # answers other than 200, and requests that raised
    p50: float
    p99: float
    max: float

    def __str__(self) -> str:
        return f"{self.p50:.0f}/{self.p99:.0f}/{self.max:.0f}"


@dataclass
class FairResult:
    provider: str
    scenario: str = "fair"
    alice_alone: Timeline | None = None
    alice_shared: Timeline | None = None
    bob: Timeline | None = None
    alice_slowdown: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class InteractiveResult:
    provider: str
    scenario: str = "interactive"
    health_idle: Latency | None = None
    chat_idle: Latency | None = None
    health_busy: Latency | None = None
    chat_busy: Latency | None = None
    batch: Timeline | None = None
    batch_requests_per_second: float | None = None
    cancel: Timeline | None = None  # seconds from the cancel call
    notes: list[str] = field(default_factory=list)


# --- Processes ---------------------------------------------------------------------------------------


def provider_run_yaml(provider: str, directory: Path, settings: dict[str, Any]) -> Path:
    """A run.yaml for `provider` whose batches config also has `settings` (None: the line removed)."""
    base = RUN_YAML if provider == "ours" else builtin_run_yaml(directory)
    changes = {**(OURS_CONFIG if provider == "ours" else BUILTIN_CONFIG), **settings}
    config = yaml.safe_load(base.read_text())
    batches_config = config["providers"]["batches"][0]["config"]
    for name, value in changes.items():
        if value is None:
            batches_config.pop(name, None)
        else:
            batches_config[name] = value
    path = directory / f"run-{provider}-bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def running_standin(work_dir: Path, latency_seconds: float) -> Iterator[ServerProcess]:
    standin = start_standin(work_dir, latency_mean=latency_seconds)
    try:
        yield standin
    finally:
        standin.stop()


@contextmanager
def running_stack(
    provider: str, work_dir: Path, standin: ServerProcess, settings: dict[str, Any], auth_endpoint: str = ""
) -> Iterator[ServerProcess]:
    """A fresh stack (its own run.yaml, state directory and log) for `provider`, stopped on exit."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{provider}-", dir=work_dir))
    run_yaml = provider_run_yaml(provider, run_dir, settings)
    if auth_endpoint:
        run_yaml = run_yaml_with_auth(run_dir, auth_endpoint, base=run_yaml)
    stack = start_stack(run_dir, run_dir / "state", f"{standin.url}/v1", run_yaml=run_yaml)
    try:
        yield stack
    finally:
        stack.stop()


# --- Batches -----------------------------------------------------------------------------------------


def client_for(stack: ServerProcess, token: str = "none") -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=60)


def upload_chat_batch_file(client: OpenAI, requests: int, tag: str) -> str:
    """Upload `requests` tiny chat requests as a batch input file; its id."""
    rows = []
    for n in range(requests):
        body = {"model": "local/m-chat", "messages": [{"role": "user", "content": f"{tag} {n}"}]}
        line = {"custom_id": f"{tag}-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        rows.append(json.dumps(line))
    content = ("\n".join(rows) + "\n").encode()
    return client.files.create(file=(f"{tag}.jsonl", content), purpose="batch").id


def create_batch(client: OpenAI, file_id: str) -> tuple[str, float]:
    """Create a chat batch; its id and the perf_counter time just before the create call."""
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    return batch.id, started


def follow(
    client: OpenAI,
    batch_id: str,
    started: float,
    timeout: float,
    until: str = "ended",
    give_up: threading.Event | None = None,
) -> Timeline:
    """Poll a batch until its timeline has `until` ("in_progress", "first_result", "ended"), it ends,
    `timeout` seconds from `started` pass, or `give_up` is set."""
    timeline = Timeline()
    while time.perf_counter() < started + timeout and not (give_up and give_up.is_set()):
        try:
            batch = client.batches.retrieve(batch_id)
            timeline.observe(batch, time.perf_counter() - started)
        except openai.APIError:
            timeline.retrieve_errors += 1
        if getattr(timeline, until) is not None or timeline.ended is not None:
            break
        time.sleep(POLL_SECONDS)
    return timeline


def note_unfinished(notes: list[str], who: str, timeline: Timeline, timeout: float, until: str = "ended") -> None:
    if getattr(timeline, until) is None:
        notes.append(f"{who}: still {timeline.status or 'unseen'} after {timeout:.0f} s")
    if timeline.retrieve_errors:
        notes.append(f"{who}: {timeline.retrieve_errors} retrieve calls failed")


# --- Scenario: fair ----------------------------------------------------------------------------------


def fair_settings(sizes: Sizes) -> dict[str, Any]:
    return {"max_concurrent_requests_per_batch": sizes.fair_window}


def alice_alone(provider: str, sizes: Sizes, work_dir: Path, standin: ServerProcess, auth: str) -> Timeline:
    with running_stack(provider, work_dir, standin, fair_settings(sizes), auth) as stack:
        warm_up(stack, headers={"Authorization": "Bearer alice-token"})
        alice = client_for(stack, "alice-token")
        file_id = upload_chat_batch_file(alice, sizes.alice_requests, "alice")
        batch_id, started = create_batch(alice, file_id)
        return follow(alice, batch_id, started, sizes.batch_timeout_seconds)


def alice_with_bob(
    provider: str, sizes: Sizes, work_dir: Path, standin: ServerProcess, auth: str
) -> tuple[Timeline, Timeline]:
    """Alice's large batch, and bob's small one created `bob_delay_seconds` later: both timelines."""
    with running_stack(provider, work_dir, standin, fair_settings(sizes), auth) as stack:
        warm_up(stack, headers={"Authorization": "Bearer alice-token"})
        alice, bob = client_for(stack, "alice-token"), client_for(stack, "bob-token")
        alice_file = upload_chat_batch_file(alice, sizes.alice_requests, "alice")
        bob_file = upload_chat_batch_file(bob, sizes.bob_requests, "bob")
        timeout, give_up = sizes.batch_timeout_seconds, threading.Event()
        with ThreadPoolExecutor(max_workers=1) as pool:
            alice_batch, alice_started = create_batch(alice, alice_file)
            alice_timeline = pool.submit(follow, alice, alice_batch, alice_started, timeout, give_up=give_up)
            try:
                time.sleep(max(0.0, alice_started + sizes.bob_delay_seconds - time.perf_counter()))
                bob_batch, bob_started = create_batch(bob, bob_file)
                bob_timeline = follow(bob, bob_batch, bob_started, timeout)
            except BaseException:
                give_up.set()  # do not keep following alice's batch once this run has failed
                raise
            return alice_timeline.result(), bob_timeline


def run_fair(result: FairResult, sizes: Sizes, work_dir: Path) -> None:
    timeout = sizes.batch_timeout_seconds
    with token_endpoint(USERS) as auth, running_standin(work_dir, sizes.fair_latency_seconds) as standin:
        print(f"  {result.provider}: alice alone", flush=True)
        result.alice_alone = alice_alone(result.provider, sizes, work_dir, standin, auth)
        note_unfinished(result.notes, "alice alone", result.alice_alone, timeout)
        print(f"  {result.provider}: alice with bob", flush=True)
        result.alice_shared, result.bob = alice_with_bob(result.provider, sizes, work_dir, standin, auth)
        note_unfinished(result.notes, "alice with bob", result.alice_shared, timeout)
        note_unfinished(result.notes, "bob", result.bob, timeout)
    alone, shared = result.alice_alone.ended, result.alice_shared.ended
    if alone and shared:
        result.alice_slowdown = round(shared / alone, 2)


# --- Scenario: interactive ---------------------------------------------------------------------------


class Prober(threading.Thread):
    """Sends one request every `interval` seconds (at once after a slower answer) and records latencies."""

    def __init__(self, send: Callable[[httpx.Client], httpx.Response], interval: float) -> None:
        super().__init__(daemon=True)
        self.send = send
        self.interval = interval
        self.stop_event = threading.Event()
        self.latencies_ms: list[float] = []
        self.errors = 0

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            next_at = time.perf_counter()
            while not self.stop_event.is_set():
                asked = time.perf_counter()
                try:
                    ok = self.send(client).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies_ms.append((time.perf_counter() - asked) * 1000)
                self.errors += not ok
                next_at = max(next_at + self.interval, time.perf_counter())
                self.stop_event.wait(next_at - time.perf_counter())

    def summary(self) -> Latency | None:
        if not self.latencies_ms:
            return None
        values = self.latencies_ms
        return Latency(
            len(values),
            self.errors,
            round(percentile(values, 0.5), 1),
            round(percentile(values, 0.99), 1),
            round(max(values), 1),
        )


def probe(stack: ServerProcess, seconds: float) -> tuple[Latency | None, Latency | None]:
    """Latencies of GET /v1/health every 50 ms and of a chat completion every 200 ms, for `seconds`."""
    chat = {"model": "local/m-chat", "messages": [{"role": "user", "content": "are you there?"}]}
    health = Prober(lambda client: client.get(f"{stack.url}/v1/health"), 0.05)
    chatter = Prober(lambda client: client.post(f"{stack.url}/v1/chat/completions", json=chat), 0.2)
    for prober in (health, chatter):
        prober.start()
    try:
        time.sleep(seconds)
    finally:
        for prober in (health, chatter):
            prober.stop_event.set()
    for prober in (health, chatter):
        prober.join(timeout=60)
    return health.summary(), chatter.summary()


def completed_now(client: OpenAI, batch_id: str, notes: list[str]) -> tuple[int | None, str, float]:
    """The batch's completed count and status (None and "" if it cannot be read: noted), and when
    they were read (perf_counter)."""
    try:
        batch = client.batches.retrieve(batch_id)
    except openai.APIError as exc:
        notes.append(f"batch progress unreadable: {type(exc).__name__}")
        return None, "", time.perf_counter()
    return (batch.request_counts.completed if batch.request_counts else 0), batch.status, time.perf_counter()


def cancel(result: InteractiveResult, client: OpenAI, batch_id: str, timeout: float) -> None:
    started = time.perf_counter()
    try:
        client.batches.cancel(batch_id)
    except openai.APIError as exc:
        result.notes.append(f"cancel call failed: {type(exc).__name__}: {exc}"[:200])
    result.cancel = follow(client, batch_id, started, timeout)
    note_unfinished(result.notes, "cancelled batch", result.cancel, timeout)


def run_interactive(result: InteractiveResult, sizes: Sizes, work_dir: Path) -> None:
    settings = {"max_concurrent_requests_per_batch": sizes.interactive_window}
    with (
        running_standin(work_dir, 0.0) as standin,
        running_stack(result.provider, work_dir, standin, settings) as stack,
    ):
        warm_up(stack)
        print(f"  {result.provider}: idle probes", flush=True)
        result.health_idle, result.chat_idle = probe(stack, sizes.idle_seconds)
        client = client_for(stack)
        file_id = upload_chat_batch_file(client, sizes.interactive_requests, "load")
        batch_id, started = create_batch(client, file_id)
        result.batch = follow(client, batch_id, started, sizes.batch_timeout_seconds, until="first_result")
        note_unfinished(result.notes, "batch", result.batch, sizes.batch_timeout_seconds, until="first_result")
        if result.batch.first_result is None or result.batch.ended is not None:
            result.notes.append("batch not running: no probes during it")
            return
        print(f"  {result.provider}: probes during the batch", flush=True)
        before, _, read_before = completed_now(client, batch_id, result.notes)
        result.health_busy, result.chat_busy = probe(stack, sizes.busy_seconds)
        after, status, read_after = completed_now(client, batch_id, result.notes)
        if before is not None and after is not None:
            result.batch_requests_per_second = round((after - before) / (read_after - read_before), 1)
        if status in TERMINAL:
            result.notes.append(f"batch ended ({status}) during the probes: req/s understated")
        else:
            cancel(result, client, batch_id, sizes.cancel_timeout_seconds)


# --- Output ------------------------------------------------------------------------------------------


def timeline_value(name: str, attribute: str) -> Callable[[Any], Any]:
    return lambda result: getattr(getattr(result, name), attribute, None)


FAIR_ROWS: list[tuple[str, Callable[[Any], Any]]] = [
    ("bob to in_progress s", timeline_value("bob", "in_progress")),
    ("bob to start s", timeline_value("bob", "first_result")),
    ("bob to completed s", timeline_value("bob", "ended")),
    ("bob status", timeline_value("bob", "status")),
    ("alice alone s", timeline_value("alice_alone", "ended")),
    ("alice with bob s", timeline_value("alice_shared", "ended")),
    ("alice slowdown x", lambda result: result.alice_slowdown),
    ("alice alone status", timeline_value("alice_alone", "status")),
    ("alice with bob status", timeline_value("alice_shared", "status")),
]
INTERACTIVE_ROWS: list[tuple[str, Callable[[Any], Any]]] = [
    ("health idle ms", lambda result: result.health_idle),
    ("health busy ms", lambda result: result.health_busy),
    ("chat idle ms", lambda result: result.chat_idle),
    ("chat busy ms", lambda result: result.chat_busy),
    ("chat errors idle/busy", lambda r: f"{getattr(r.chat_idle, 'errors', '-')}/{getattr(r.chat_busy, 'errors', '-')}"),
    ("batch start s", timeline_value("batch", "first_result")),
    ("batch req/s", lambda result: result.batch_requests_per_second),
    ("cancel ended s", timeline_value("cancel", "ended")),
    ("cancel status", timeline_value("cancel", "status")),
]


def print_table(title: str, rows: list[tuple[str, Callable[[Any], Any]]], results: list[Any]) -> None:
    if not results:
        return
    print(f"\n{title}")
    print(f"  {'':<22}" + "".join(f"{result.provider:>20}" for result in results))
    for label, value in rows:
        cells = (str(value(result)) if value(result) not in (None, "") else "-" for result in results)
        print(f"  {label:<22}" + "".join(f"{cell:>20}" for cell in cells))
    for result in results:
        for note in result.notes:
            print(f"  note ({result.provider}): {note}")


def print_tables(results: list[Any], sizes: Sizes) -> None:
    fair = [result for result in results if result.scenario == "fair"]
    interactive = [result for result in results if result.scenario == "interactive"]
    print_table(
        f"fair: alice {sizes.alice_requests} requests, bob {sizes.bob_requests} requests"
        f" {sizes.bob_delay_seconds:g} s later; latency {sizes.fair_latency_seconds * 1000:.0f} ms,"
        f" window {sizes.fair_window}",
        FAIR_ROWS,
        fair,
    )
    print_table(
        f"interactive: {sizes.interactive_requests} requests at zero latency, window {sizes.interactive_window};"
        f" latencies p50/p99/max, idle {sizes.idle_seconds:g} s, busy {sizes.busy_seconds:g} s",
        INTERACTIVE_ROWS,
        interactive,
    )


# --- Main --------------------------------------------------------------------------------------------


RUNNERS: dict[str, tuple[type, Callable[[Any, Sizes, Path], None]]] = {
    "fair": (FairResult, run_fair),
    "interactive": (InteractiveResult, run_interactive),
}


def run_scenario(scenario: str, provider: str, sizes: Sizes, work_dir: Path) -> Any:
    """One (scenario, provider) run; an error ends it with a note, keeping the figures it had."""
    result_type, runner = RUNNERS[scenario]
    result = result_type(provider)
    try:
        runner(result, sizes, work_dir)
    except Exception as exc:
        traceback.print_exc()
        first_line = (str(exc).splitlines() or [""])[0]
        result.notes.append(f"aborted: {type(exc).__name__}: {first_line}"[:200])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(RUNNERS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--out", type=Path, help="also write the results here, as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke check")
    args = parser.parse_args()
    scenarios, providers = args.scenarios.split(","), args.providers.split(",")
    unknown = (set(scenarios) - set(RUNNERS)) | (set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown scenario or provider: {', '.join(sorted(unknown))}")
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES

    work_dir = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    results = []
    for scenario in scenarios:
        for provider in providers:
            print(f"running {scenario} on {provider}...", flush=True)
            results.append(run_scenario(scenario, provider, sizes, work_dir))
            print(f"  {asdict(results[-1])}", flush=True)
    print_tables(results, sizes)
    if args.out:
        args.out.write_text(json.dumps({"sizes": asdict(sizes), "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nlogs: {work_dir}")


if __name__ == "__main__":
    main()
