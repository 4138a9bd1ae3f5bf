"""Three real stack servers sharing PostgreSQL (kvstore and SQL store) and one files directory, as
run-replicas.yaml deploys them: any replica serves any batch, each batch runs on one replica at a
time, a dead replica's batch is taken over, a cancel reaches the replica running the batch, and
idempotent creates stay exactly-once across replicas.

Which replica holds a batch is read from the batches table (`lease_holder` names the server
process). The figures measured are written to `replicas.json` in the test session's directory.
"""

import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cryptography.fernet import Fernet
from openai import ConflictError, OpenAI

from tests.integration.batching import (
    chat_lines,
    create_chat_batch,
    read_result_file,
    record,
    sent_per_request,
    upload_jsonl,
    wait_for_batch,
)
from tools.harness import (
    REPLICAS_RUN_YAML,
    ServerProcess,
    StandInControl,
    fresh_replica_set_env,
    server_up,
    start_stack,
    warm_up,
)
from tools.webhook_receiver import WebhookReceiver

REPLICAS = 3
LEASE_SECONDS = 3
WINDOW = 10
REQUESTS_PER_SHARD = 250  # a batch of 2,000 requests runs as 8 shards, on every replica


@dataclass
class Cluster:
    """Replicas started from run-replicas.yaml over one database table and one files directory."""

    run_dir: Path
    model_url: str
    env: dict[str, str]
    servers: list[ServerProcess] = field(default_factory=list)

    def start_replica(self) -> ServerProcess:
        state = self.run_dir / f"replica-{uuid.uuid4().hex[:6]}"
        server = start_stack(self.run_dir, state, self.model_url, self.env, run_yaml=REPLICAS_RUN_YAML)
        warm_up(server)
        self.servers.append(server)
        return server

    def clients(self) -> list[OpenAI]:
        return [OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60) for s in self.servers]

    def lease(self, batch_id: str) -> tuple[str | None, int, bool]:
        """(the server holding the batch or that held it last, the lease epoch, whether it is held now)."""
        table = self.env["BATCHES_SQL_TABLE"]
        connection = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT lease_holder, lease_epoch, lease_token IS NOT NULL FROM {table} WHERE id = %s", (batch_id,)
                )
                row = cursor.fetchone()
        finally:
            connection.close()
        assert row is not None, batch_id
        return row

    def server_of(self, holder: str | None) -> ServerProcess:
        """The replica whose process holds (or held) a lease."""
        assert holder is not None
        pid = int(holder.split(":")[1])
        return next(s for s in self.servers if s.process.pid == pid)

    def wait_for_holder(self, batch_id: str, epoch_above: int = 0, timeout: float = 30) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            holder, epoch, held = self.lease(batch_id)
            if held and epoch > epoch_above:
                return holder, epoch  # type: ignore[return-value]
            time.sleep(0.05)
        raise AssertionError(f"nobody claimed {batch_id} in {timeout} s")


@pytest.fixture(scope="module")
def cluster(run_dir: Path, standin_server: ServerProcess) -> Iterator[Cluster]:
    if not server_up(5432):
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    env = fresh_replica_set_env(
        run_dir,
        BATCHES_LEASE_SECONDS=str(LEASE_SECONDS),
        BATCHES_MAX_CONCURRENT_REQUESTS=str(WINDOW),
        BATCHES_CANCEL_GRACE_SECONDS="1",
        BATCHES_REQUESTS_PER_SHARD=str(REQUESTS_PER_SHARD),
        BATCHES_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        BATCHES_WEBHOOK_KEY=Fernet.generate_key().decode(),  # every replica opens the secrets any of them sealed
    )
    cluster = Cluster(run_dir, f"{standin_server.url}/v1", env)
    try:
        for _ in range(REPLICAS):
            cluster.start_replica()
        yield cluster
    finally:
        for server in cluster.servers:
            server.stop(signal.SIGKILL)


@dataclass
class RunningBatch:
    """A batch under way on one replica, seen from another."""

    batch_id: str
    lines: list[dict[str, Any]]
    holder: str
    epoch: int
    runner: ServerProcess  # the replica running it
    elsewhere: OpenAI  # a client of another replica


def start_batch(cluster: Cluster, requests: int, until_completed: int) -> RunningBatch:
    """Create a batch through the first replica; return once `until_completed` requests are done."""
    clients = cluster.clients()
    lines = chat_lines(requests)
    batch = create_chat_batch(clients[0], lines)
    holder, epoch = cluster.wait_for_holder(batch.id)
    runner = cluster.server_of(holder)
    elsewhere = next(c for c, s in zip(clients, cluster.servers, strict=True) if s is not runner)
    while elsewhere.batches.retrieve(batch.id).request_counts.completed < until_completed:
        time.sleep(0.05)
    holder, epoch = cluster.wait_for_holder(batch.id)  # now: a loaded machine may have moved the lease meanwhile
    runner = cluster.server_of(holder)
    elsewhere = next(c for c, s in zip(clients, cluster.servers, strict=True) if s is not runner)
    return RunningBatch(batch.id, lines, holder, epoch, runner, elsewhere)


def test_batches_created_through_any_replica_complete_and_spread_over_replicas(
    cluster: Cluster, standin: StandInControl, run_dir: Path
) -> None:
    standin.configure(latency_mean=0.1)
    clients = cluster.clients()
    batches = [create_chat_batch(clients[n % REPLICAS], chat_lines(40)) for n in range(6)]
    for n, batch in enumerate(batches):
        # Every replica answers for every batch, whichever created or runs it.
        finished = wait_for_batch(clients[(n + 1) % REPLICAS], batch.id, timeout=120)
        assert finished.status == "completed", finished
        assert finished.request_counts.completed == 40
        assert len(read_result_file(clients[(n + 2) % REPLICAS], finished.output_file_id)) == 40
    ran_on = {cluster.server_of(cluster.lease(b.id)[0]).url for b in batches}
    assert len(ran_on) > 1
    listed = {b.id for b in clients[2].batches.list(limit=100).data}
    assert {b.id for b in batches} <= listed
    record(run_dir, "replicas.json", "spread", {"batches": len(batches), "replicas_that_ran_batches": len(ran_on)})


def test_concurrent_idempotent_creates_over_every_replica_give_one_batch(cluster: Cluster) -> None:
    clients = cluster.clients()
    file_id = upload_jsonl(clients[0], chat_lines(3))
    key = f"replicas-{uuid.uuid4().hex}"

    def create(n: int) -> str:
        client = clients[n % REPLICAS]
        batch = client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"idempotency_key": key},
        )
        return batch.id

    with ThreadPoolExecutor(max_workers=25) as pool:
        ids = set(pool.map(create, range(50)))
    assert len(ids) == 1
    [batch_id] = ids
    assert wait_for_batch(clients[1], batch_id).status == "completed"
    with pytest.raises(ConflictError):
        clients[2].batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"other": "parameters"},
            extra_body={"idempotency_key": key},
        )


def test_a_cancel_through_another_replica_stops_the_batch_where_it_runs(
    cluster: Cluster, standin: StandInControl, run_dir: Path
) -> None:
    standin.configure(latency_mean=0.2)
    running = start_batch(cluster, requests=600, until_completed=20)
    batch_id, lines, other = running.batch_id, running.lines, running.elsewhere
    cancelled_at = time.monotonic()
    assert other.batches.cancel(batch_id).status == "cancelling"
    # The holder learns of the cancel at its next lease renewal and stops dispatching.
    sent_before, stopped_at = sum(sent_per_request(standin, lines)), None
    while time.monotonic() - cancelled_at < 10:
        time.sleep(0.25)
        sent_now = sum(sent_per_request(standin, lines))
        if sent_now == sent_before:
            stopped_at = time.monotonic()
            break
        sent_before = sent_now
    assert stopped_at is not None, "the replica running the batch kept sending requests"
    final = wait_for_batch(other, batch_id, timeout=30)
    done_at = time.monotonic()
    assert final.status == "cancelled"
    assert final.request_counts.completed < len(lines)
    # Nothing more is sent once the batch is cancelled.
    time.sleep(1)
    assert sum(sent_per_request(standin, lines)) == sent_before
    record(
        run_dir,
        "replicas.json",
        "cancel_elsewhere",
        {
            "requests_stopped_after_s": round(stopped_at - cancelled_at, 2),
            "cancelled_after_s": round(done_at - cancelled_at, 2),
            "completed": final.request_counts.completed,
        },
    )


@pytest.mark.parametrize(
    ("sig", "most_repeats"), [(signal.SIGKILL, 2 * WINDOW), (signal.SIGTERM, 0)], ids=["kill", "term"]
)
def test_a_replica_leaving_mid_batch_hands_it_over_and_it_completes_once(
    cluster: Cluster, standin: StandInControl, run_dir: Path, sig: signal.Signals, most_repeats: int
) -> None:
    """SIGKILL: another replica takes the batch over once the lease expires and repeats the requests
    that were in flight (plus at most one unwritten group commit). SIGTERM: the stack shuts the
    provider down, which stores what is in flight and releases the lease: taken over at once,
    nothing repeated."""
    standin.configure(latency_mean=0.05)
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")  # the log's time format, to the second
    running = start_batch(cluster, requests=2000, until_completed=400)
    lines = running.lines

    left_at = time.monotonic()
    running.runner.stop(sig)
    cluster.servers.remove(running.runner)
    new_holder, new_epoch = cluster.wait_for_holder(running.batch_id, running.epoch, timeout=LEASE_SECONDS + 15)
    taken_over_after = time.monotonic() - left_at
    assert new_holder != running.holder

    finished = wait_for_batch(running.elsewhere, running.batch_id, timeout=180)
    assert finished.status == "completed", finished
    seen = [line["custom_id"] for line in read_result_file(running.elsewhere, finished.output_file_id)]
    assert len(seen) == len(set(seen)) == len(lines)  # every custom_id exactly once
    assert finished.request_counts.completed == len(lines)
    sent = sent_per_request(standin, lines)
    repeated = sum(count - 1 for count in sent)
    done_runs = [
        (server.url, run)
        for server in [*cluster.servers, running.runner]
        for run in server.shard_runs(running.batch_id, since=started)
        if run["stop"] == "done"
    ]
    shards_done_by = Counter(url for url, _ in done_runs)
    # OGX redacts batch ids in its log: there the runs are told apart by time only, and a shard run of
    # an earlier batch ending in the same second counts too, so only which shards were done is exact.
    redacted = any(run.get("batch_id") == "<REDACTED>" for _, run in done_runs)
    record(
        run_dir,
        "replicas.json",
        f"takeover_after_{sig.name}",
        {
            "lease_seconds": LEASE_SECONDS,
            "taken_over_after_s": round(taken_over_after, 2),
            "epoch": new_epoch,
            "requests": len(lines),
            "repeated": repeated,
            "shards_done_per_replica": sorted(shards_done_by.values()),
            "repeats_per_shard": dict(
                Counter(n // REQUESTS_PER_SHARD for n, count in enumerate(sent) for _ in range(count - 1))
            ),
        },
    )
    assert min(sent) >= 1 and max(sent) <= 2 and repeated <= most_repeats
    shards = len(lines) // REQUESTS_PER_SHARD
    assert {int(run["shard"]) for _, run in done_runs} == set(range(shards))  # every shard done
    if not redacted:
        assert sum(shards_done_by.values()) == shards  # and each once
    assert len(shards_done_by) >= 2, shards_done_by  # one batch, on several replicas
    cluster.start_replica()  # back to three for whatever runs next


def test_each_event_reaches_the_receiver_once_whichever_replica_ends_the_batch(cluster: Cluster) -> None:
    clients = cluster.clients()
    with WebhookReceiver() as receiver:
        endpoint = clients[0].webhooks.create(name="all", url=receiver.url, event_types=["batch.completed"])
        batches = [create_chat_batch(clients[n % REPLICAS], chat_lines(3)) for n in range(2 * REPLICAS)]
        for batch in batches:
            wait_for_batch(clients[1], batch.id)
        receiver.wait_for(len(batches), accepted=True)
        time.sleep(2.0)  # any replica that would send one again has had its chance
        clients[2].webhooks.delete(endpoint.id)  # endpoints are shared by the replicas, like batches
    events = receiver.events(endpoint.signing_secret, accepted=False)
    assert sorted(e.data.id for e in events) == sorted(b.id for b in batches)  # each once
    assert len({e.id for e in events}) == len(batches)
