"""Scale-out: what more replicas buy. A set of stack replicas from run-replicas.yaml (PostgreSQL on
127.0.0.1:5432, one files directory) behind one address, as a load balancer with sticky sessions
would send a client's calls: every batch is created through the first replica. Each replica runs
one batch at a time. Run with this provider and with the built-in `inline::reference` on the same
replica set, and print the figures side by side.

    .venv/bin/python bench/replicas.py                        # 1 and 3 replicas, both providers
    .venv/bin/python bench/replicas.py --replicas 3 --providers ours
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compare import builtin_run_yaml
from tools.harness import (
    REPLICAS_RUN_YAML,
    ServerProcess,
    StandInControl,
    fresh_replica_set_env,
    start_stack,
    start_standin,
    warm_up,
)

BATCHES = 6
REQUESTS_PER_BATCH = 100
LATENCY_SECONDS = 0.2
WINDOW = 10


def input_file(client: OpenAI, batch: int) -> str:
    rows = [
        {
            "custom_id": f"r{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "local/m-chat", "messages": [{"role": "user", "content": f"batch {batch} question {n}"}]},
        }
        for n in range(REQUESTS_PER_BATCH)
    ]
    content = "\n".join(json.dumps(row) for row in rows).encode()
    return client.files.create(file=("bench.jsonl", content), purpose="batch").id


def run(provider: str, replicas: int, standin: ServerProcess, work_dir: Path) -> dict[str, object]:
    # One batch at a time per replica, as the built-in provider runs them: what is measured is how
    # waiting batches spread over replicas.
    env = fresh_replica_set_env(
        work_dir, BATCHES_MAX_CONCURRENT_REQUESTS=str(WINDOW), BATCHES_MAX_CONCURRENT_BATCHES="1"
    )
    tag = env["BATCHES_SQL_TABLE"]
    run_yaml = REPLICAS_RUN_YAML if provider == "ours" else builtin_run_yaml(work_dir, REPLICAS_RUN_YAML)
    servers = [
        start_stack(work_dir, work_dir / f"{tag}-{n}", f"{standin.url}/v1", env, run_yaml=run_yaml)
        for n in range(replicas)
    ]
    try:
        for server in servers:
            warm_up(server)
        client = OpenAI(base_url=f"{servers[0].url}/v1", api_key="none", max_retries=0, timeout=120)
        files = [input_file(client, n) for n in range(BATCHES)]
        started = time.perf_counter()
        ids = [
            client.batches.create(input_file_id=f, endpoint="/v1/chat/completions", completion_window="24h").id
            for f in files
        ]
        pending = set(ids)
        completed = 0
        while pending and time.perf_counter() - started < 600:
            time.sleep(0.2)
            for batch_id in list(pending):
                batch = client.batches.retrieve(batch_id)
                if batch.status in ("completed", "failed", "expired", "cancelled"):
                    pending.discard(batch_id)
                    completed += batch.request_counts.completed if batch.request_counts else 0
        seconds = time.perf_counter() - started
    finally:
        for server in servers:
            server.stop()
    return {
        "provider": provider,
        "replicas": replicas,
        "seconds": round(seconds, 2),
        "completed": completed,
        "unfinished_batches": len(pending),
        "requests_per_second": round(completed / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument("--providers", default="ours,builtin")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    standin = start_standin(work_dir)
    StandInControl(standin.url).configure(latency_mean=LATENCY_SECONDS, latency_sigma=0)
    results = []
    try:
        for replicas in (int(n) for n in args.replicas.split(",")):
            for provider in args.providers.split(","):
                print(f"running {BATCHES} batches on {replicas} replica(s) with {provider}...", flush=True)
                results.append(run(provider, replicas, standin, work_dir))
                print(f"  {results[-1]}", flush=True)
    finally:
        standin.stop()
    ideal_one = BATCHES * REQUESTS_PER_BATCH * LATENCY_SECONDS / WINDOW
    print(f"\n{BATCHES} batches x {REQUESTS_PER_BATCH} requests, {LATENCY_SECONDS} s each, window {WINDOW}, one batch")
    print(f"at a time per replica, all created through the first replica (one replica's ideal: {ideal_one:.0f} s)")
    print(f"  {'':<20}" + "".join(f"{r['provider'] + ' x' + str(r['replicas']):>14}" for r in results))
    for key in ("seconds", "completed", "unfinished_batches", "requests_per_second"):
        print(f"  {key:<20}" + "".join(f"{r[key]!s:>14}" for r in results))
    print(f"\nlogs: {work_dir}")


if __name__ == "__main__":
    main()
