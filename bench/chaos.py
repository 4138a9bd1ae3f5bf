"""Dependency outages, real ones, during a batch: what is lost, repeated and how soon work goes on.
Run with this provider and with the built-in `inline::reference`, and print the figures side by side.

    .venv/bin/python bench/chaos.py                                   # every scenario, both providers
    .venv/bin/python bench/chaos.py --scenarios db-2s,db-20s --providers ours

Scenarios (requests go to the stand-in model server, latency 100 ms, started here):
    db-2s, db-20s, db-90s   the stacks' PostgreSQL (a server of this run's own) stopped for that long,
                            twice, during an 800-request batch: this provider on two replicas from
                            run-replicas.yaml, the built-in one on one stack of the same file (its
                            batches are not safe on several)
    cut-20s                 one of the two replicas (the one running the batch) cut off from the
                            database for 20 s by a proxy (tools/tcp_proxy.py), its model registry
                            still reachable: this provider only (the built-in one runs on one stack,
                            where a cut is the database outage above)
    files-40s               the files volume (a tmpfs) read-only for 40 s as a 300-request batch
                            reaches its end; one stack of run.yaml
Columns: the batch's final status; requests in; lines out (output and error files); whether every
custom_id has exactly one line; error lines; requests the model saw twice; seconds from each
dependency's return until 20 more requests were done (`-` if they never were); whether the stack
still answered /v1/models afterwards.
"""

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compare import builtin_run_yaml
from tools.harness import (
    REPLICAS_RUN_YAML,
    RUN_YAML,
    ServerProcess,
    StandInControl,
    fresh_replica_set_env,
    replicas_run_yaml_with_sql_apart,
    start_stack,
    start_standin,
    warm_up,
)
from tools.private_postgres import PrivatePostgres
from tools.tcp_proxy import TcpProxy
from tools.volumes import CannotMountError, tmpfs_volume

TERMINAL = ("completed", "failed", "expired", "cancelled")
PROGRESS_AFTER_RETURN = 20
RECOVERY_LIMIT_SECONDS = 60.0
END_LIMIT_SECONDS = 120.0  # for the batch to end after the last outage


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: int
    down_seconds: float
    outages: int
    fault: str  # "database", "partition" or "files"


SCENARIOS = {
    "db-2s": Scenario("db-2s", 800, 2.0, 2, "database"),
    "db-20s": Scenario("db-20s", 800, 20.0, 2, "database"),
    "db-90s": Scenario("db-90s", 800, 90.0, 1, "database"),
    "cut-20s": Scenario("cut-20s", 800, 20.0, 1, "partition"),
    "files-40s": Scenario("files-40s", 300, 40.0, 1, "files"),
}


@dataclass
class Outcome:
    provider: str
    scenario: str
    status: str = "-"
    requests: int = 0
    lines: int = 0
    each_once: bool = False
    error_lines: int = 0
    sent_twice: int = 0
    recovered_s: list[str] = field(default_factory=list)
    serving_after: bool = False
    notes: list[str] = field(default_factory=list)


def batch_lines(requests: int, tag: str) -> tuple[bytes, list[str]]:
    rows, prompts = [], []
    for n in range(requests):
        prompt = f"{tag} question {n}"
        body = {"model": "local/m-chat", "messages": [{"role": "user", "content": prompt}]}
        line = {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        rows.append(json.dumps(line).encode())
        prompts.append(prompt)
    return b"\n".join(rows) + b"\n", prompts


def retrieve_or_none(client: OpenAI, batch_id: str) -> Any:
    try:
        return client.batches.retrieve(batch_id)
    except Exception:  # the dependency is out: the API may not answer meanwhile
        return None


def done_of(batch: Any) -> int:
    counts = batch.request_counts
    return counts.completed + counts.failed if counts else 0


def wait_for_done(client: OpenAI, batch_id: str, at_least: int, limit: float) -> float | None:
    """Seconds until the batch has `at_least` requests done, or None if it did not within `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        batch = retrieve_or_none(client, batch_id)
        if batch is not None and (batch.status in TERMINAL or done_of(batch) >= at_least):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def serves_models(server: ServerProcess) -> bool:
    try:
        return httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def read_lines(client: OpenAI, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    return [line for line in client.files.content(file_id).text.splitlines() if line.strip()]


def measure(
    outcome: Outcome,
    scenario: Scenario,
    servers: list[ServerProcess],
    standin: StandInControl,
    fault: Callable[[bool], None],
) -> None:
    """Run one batch through `servers[0]`, with `fault(True)` / `fault(False)` around each outage."""
    clients = [OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=30) for s in servers]
    content, prompts = batch_lines(scenario.requests, uuid.uuid4().hex[:8])
    outcome.requests = scenario.requests
    file_id = clients[0].files.create(file=("chaos.jsonl", content), purpose="batch").id
    batch = clients[0].batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    watcher = clients[-1]
    for number in range(scenario.outages):
        share = 0.9 if scenario.fault == "files" else (number + 1) / (scenario.outages + 2)
        if wait_for_done(watcher, batch.id, int(share * scenario.requests), RECOVERY_LIMIT_SECONDS) is None:
            outcome.notes.append(f"no progress before outage {number + 1}")
            break
        before = retrieve_or_none(watcher, batch.id)
        done_before = done_of(before) if before is not None else 0
        fault(True)
        time.sleep(scenario.down_seconds)
        fault(False)
        if scenario.fault == "files":
            recovered = wait_for_done(watcher, batch.id, scenario.requests + 1, RECOVERY_LIMIT_SECONDS)  # its end
        else:
            recovered = wait_for_done(watcher, batch.id, done_before + PROGRESS_AFTER_RETURN, RECOVERY_LIMIT_SECONDS)
        outcome.recovered_s.append("-" if recovered is None else f"{recovered:.1f}")
        if recovered is None:
            outcome.notes.append(f"no progress in the {RECOVERY_LIMIT_SECONDS:.0f} s after outage {number + 1}")
            break
    deadline = time.monotonic() + END_LIMIT_SECONDS
    final = retrieve_or_none(watcher, batch.id)
    while (final is None or final.status not in TERMINAL) and time.monotonic() < deadline:
        time.sleep(0.2)
        final = retrieve_or_none(watcher, batch.id)
    if final is None:
        outcome.notes.append("the batch could not be retrieved at the end")
        return
    outcome.status = final.status
    output, errors = read_lines(clients[0], final.output_file_id), read_lines(clients[0], final.error_file_id)
    ids = [json.loads(line)["custom_id"] for line in output + errors]
    outcome.lines = len(ids)
    outcome.each_once = sorted(ids) == sorted(f"r{n}" for n in range(scenario.requests))
    outcome.error_lines = len(errors)
    seen = standin.stats()["by_prompt"]
    outcome.sent_twice = sum(max(0, seen.get(prompt, 0) - 1) for prompt in prompts)
    outcome.serving_after = all(serves_models(server) for server in servers)


def run_database(provider: str, scenario: Scenario, standin: ServerProcess, work_dir: Path) -> Outcome:
    """A database outage, or a partition: then the first replica reaches the database through a proxy."""
    outcome = Outcome(provider, scenario.name)
    if provider != "ours" and scenario.fault == "partition":
        outcome.notes.append("not run: the built-in provider runs on one stack")
        return outcome
    run_yaml = REPLICAS_RUN_YAML if provider == "ours" else builtin_run_yaml(work_dir, base=REPLICAS_RUN_YAML)
    replicas = 2 if provider == "ours" else 1
    with PrivatePostgres() as database, TcpProxy(target_port=database.port) as proxy:
        env = fresh_replica_set_env(work_dir, POSTGRES_PORT=str(database.port), BATCHES_MAX_CONCURRENT_REQUESTS="10")
        servers: list[ServerProcess] = []
        try:
            for number in range(replicas):
                state = Path(tempfile.mkdtemp(prefix=f"{provider}-{scenario.name}-", dir=work_dir))
                yaml, settings = run_yaml, {}
                if scenario.fault == "partition" and number == 0:
                    yaml = replicas_run_yaml_with_sql_apart(work_dir)
                    settings = {"POSTGRES_PORT": str(proxy.port), "POSTGRES_KV_PORT": str(database.port)}
                servers.append(start_stack(work_dir, state, f"{standin.url}/v1", {**env, **settings}, run_yaml=yaml))
                warm_up(servers[-1])

            def restart(stop: bool) -> None:
                database.stop() if stop else database.start()

            def cut(stop: bool) -> None:
                proxy.cut() if stop else proxy.heal()

            fault = cut if scenario.fault == "partition" else restart
            measure(outcome, scenario, servers, StandInControl(standin.url), fault)
        finally:
            for server in servers:
                server.stop()
    return outcome


def run_files(provider: str, scenario: Scenario, standin: ServerProcess, work_dir: Path) -> Outcome:
    outcome = Outcome(provider, scenario.name)
    run_yaml = RUN_YAML if provider == "ours" else builtin_run_yaml(work_dir)
    state = Path(tempfile.mkdtemp(prefix=f"{provider}-{scenario.name}-", dir=work_dir))
    try:
        with tmpfs_volume(state / "files") as read_only:
            server = start_stack(work_dir, state, f"{standin.url}/v1", {}, run_yaml=run_yaml)
            try:
                warm_up(server)
                measure(outcome, scenario, [server], StandInControl(standin.url), read_only)
            finally:
                server.stop()
    except CannotMountError as exc:
        outcome.notes.append(f"cannot mount a tmpfs here: {exc}")
    return outcome


def print_table(outcomes: list[Outcome]) -> None:
    columns = [
        ("status", "status"),
        ("requests", "requests in"),
        ("lines", "lines out"),
        ("each_once", "each once"),
        ("error_lines", "error lines"),
        ("sent_twice", "sent twice"),
        ("recovered_s", "going on after (s)"),
        ("serving_after", "serving after"),
    ]
    for scenario in dict.fromkeys(o.scenario for o in outcomes):
        rows = [o for o in outcomes if o.scenario == scenario]
        print(f"\n{scenario}")
        print(f"  {'':<20}" + "".join(f"{o.provider:>18}" for o in rows))
        for attribute, label in columns:
            cells = [getattr(o, attribute) for o in rows]
            cells = [", ".join(c) or "-" if isinstance(c, list) else c for c in cells]
            print(f"  {label:<20}" + "".join(f"{c!s:>18}" for c in cells))
        for o in rows:
            for note in o.notes:
                print(f"  note ({o.provider}): {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--providers", default="ours,builtin")
    args = parser.parse_args()
    if not PrivatePostgres.available():
        sys.exit("bench/chaos.py needs PostgreSQL's server binaries (pg_config --bindir)")
    work_dir = Path(tempfile.mkdtemp(prefix="chaos-"))
    standin = start_standin(work_dir)
    StandInControl(standin.url).configure(latency_mean=0.1)
    outcomes = []
    try:
        for name in args.scenarios.split(","):
            scenario = SCENARIOS[name]
            for provider in args.providers.split(","):
                run = run_files if scenario.fault == "files" else run_database
                outcomes.append(run(provider, scenario, standin, work_dir))
                print(f"{provider} {name}: done", file=sys.stderr)
    finally:
        standin.stop()
    print_table(outcomes)


if __name__ == "__main__":
    main()
