"""Outages of the dependencies, real ones: a pause, never a failure (issue 23).

The database, under two real replicas from the shipped run-replicas.yaml:

The replicas run on a PostgreSQL server of this module's own (tools/private_postgres.py), which the
tests stop and start while a batch runs (2 s four times, 20 s twice, 90 s once: past the shipped 15 s
lease, so that other processes take the batch over): the batches table and leases, the stored results, the files'
metadata and the stack's model registry all live there. After every outage each custom_id has
exactly one line, no line is an error the outage caused, the counts read during the batch never go
back, and the stack serves model requests again without a restart. The first replica reaches the
database through a proxy (tools/tcp_proxy.py), which cuts that replica alone off for a while: a
partition (its connections refused, or silently dropped), after which the other replica has run its
shards and it sends nothing more of them.

The files volume, under one stack: made read-only (a tmpfs remounted) as a batch reaches its end, the
batch waits in `finalizing` with its true counts, and its files appear once the volume is writable.
"""

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.integration.batching import chat_lines, create_chat_batch, read_result_file, record, sent_per_request
from tools.harness import (
    REPLICAS_RUN_YAML,
    ServerProcess,
    StandInControl,
    fresh_replica_set_env,
    replicas_run_yaml_with_sql_apart,
    start_stack,
    warm_up,
)
from tools.private_postgres import PrivatePostgres
from tools.tcp_proxy import TcpProxy
from tools.volumes import CannotMountError, tmpfs_volume

REPLICAS = 2
WINDOW = 10


@pytest.fixture(scope="module")
def database() -> Iterator[PrivatePostgres]:
    if not PrivatePostgres.available():
        pytest.skip("no PostgreSQL server binaries (pg_config --bindir) on this machine")
    with PrivatePostgres() as database:
        yield database


@pytest.fixture(scope="module")
def proxy(database: PrivatePostgres) -> Iterator[TcpProxy]:
    """The first replica's way to the database."""
    with TcpProxy(target_port=database.port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def replicas(
    run_dir: Path, standin_server: ServerProcess, database: PrivatePostgres, proxy: TcpProxy
) -> Iterator[list[ServerProcess]]:
    env = fresh_replica_set_env(  # the shipped lease of 15 s: a 2 s outage is shorter, a 20 s one longer
        run_dir,
        POSTGRES_PORT=str(database.port),
        BATCHES_MAX_CONCURRENT_REQUESTS=str(WINDOW),
        BATCHES_REQUESTS_PER_SHARD="100",
    )
    through_proxy = replicas_run_yaml_with_sql_apart(run_dir)
    proxied = {"POSTGRES_PORT": str(proxy.port), "POSTGRES_KV_PORT": str(database.port)}
    servers: list[ServerProcess] = []
    try:
        for number in range(REPLICAS):
            state = run_dir / f"outage-replica-{uuid.uuid4().hex[:6]}"
            run_yaml, settings = (through_proxy, proxied) if number == 0 else (REPLICAS_RUN_YAML, {})
            server = start_stack(run_dir, state, f"{standin_server.url}/v1", {**env, **settings}, run_yaml=run_yaml)
            servers.append(server)
            warm_up(server)
        yield servers
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)


class CountsSeen:
    """Retrieves a batch through one replica every 0.1 s and keeps the counts of those that answered."""

    def __init__(self, client: OpenAI, batch_id: str) -> None:
        self.counts: list[tuple[int, int]] = []
        self.unanswered = 0
        self.slowest = 0.0  # seconds, of one retrieve
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(client, batch_id), daemon=True)
        self._thread.start()

    def _watch(self, client: OpenAI, batch_id: str) -> None:
        while not self._stop.wait(0.1):
            started = time.monotonic()
            try:
                counts = client.batches.retrieve(batch_id).request_counts
            except Exception:  # the database is out: the API may not answer meanwhile
                self.unanswered += 1
                continue
            finally:
                self.slowest = max(self.slowest, time.monotonic() - started)
            if counts is not None:
                self.counts.append((counts.completed, counts.failed))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(client: OpenAI, batch_id: str, completed: int, timeout: float = 60) -> None:
    """Wait until the batch has `completed` results, asking a replica that may not answer while (or just
    after) the database is out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            counts = client.batches.retrieve(batch_id).request_counts
        except Exception:
            counts = None
        if counts is not None and counts.completed >= completed:
            return
        time.sleep(0.05)
    raise AssertionError(f"{batch_id} did not reach {completed} completed requests in {timeout} s")


def wait_for_sends(standin: StandInControl, lines: list[dict[str, Any]], sends: int, timeout: float = 60) -> None:
    """Wait until the model has received `sends` requests of `lines` (repeats included)."""
    deadline = time.monotonic() + timeout
    while sum(sent_per_request(standin, lines)) < sends:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {sends} requests sent in {timeout} s")
        time.sleep(0.05)


def wait_for_end(client: OpenAI, batch_id: str, timeout: float) -> Any:
    """The batch once it ended, asked through a replica that may not answer while the database is out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            batch = client.batches.retrieve(batch_id)
        except Exception:
            batch = None
        if batch is not None and batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"{batch_id} did not end in {timeout} s")


def serves_models(server: ServerProcess) -> bool:
    chat = {"model": "local/m-chat", "messages": [{"role": "user", "content": "still there?"}]}
    models = httpx.get(f"{server.url}/v1/models", timeout=30)
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30)
    return models.status_code == answer.status_code == 200


# Seconds the database stays down, one entry per stop, spread over the batch: a server that blinks
# again and again, one down for longer than the shipped lease (15 s), and one for a minute and a half.
RESTARTS = {"2s-x4": (2.0, 2.0, 2.0, 2.0), "20s-x2": (20.0, 20.0), "90s": (90.0,)}
# The design's figure is under 5 s (claims every 2 s, leases probed at once); the rest is slack for a
# loaded CI machine, still below the 15 s lease, so that a takeover alone would not pass.
RESUMED_WITHIN_S = 10


@pytest.mark.parametrize("down_seconds", list(RESTARTS.values()), ids=list(RESTARTS))
def test_database_restarts_during_a_batch_lose_nothing_and_need_no_restart_of_the_stack(
    replicas: list[ServerProcess],
    database: PrivatePostgres,
    standin: StandInControl,
    run_dir: Path,
    down_seconds: tuple[float, ...],
) -> None:
    standin.configure(latency_mean=0.1)
    clients = [OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=30) for s in replicas]
    lines = chat_lines(800)
    batch = create_chat_batch(clients[0], lines)
    seen = CountsSeen(clients[1], batch.id)
    outages = []
    step = len(lines) // (len(down_seconds) + 1)
    for number, down in enumerate(down_seconds, start=1):
        completed = number * step
        wait_until(clients[1], batch.id, completed)
        database.stop()
        stopped_at = time.monotonic()
        time.sleep(down)
        database.start()
        back_at = time.monotonic()
        wait_for_sends(standin, lines, sum(sent_per_request(standin, lines)) + 20)  # going on again
        outages.append(
            {"down_s": round(back_at - stopped_at, 1), "resumed_after_s": round(time.monotonic() - back_at, 1)}
        )
    final = wait_for_end(clients[1], batch.id, timeout=180)
    seen.stop()
    assert all(outage["resumed_after_s"] <= RESUMED_WITHIN_S for outage in outages), outages

    assert final.status == "completed", final.errors
    assert final.error_file_id is None  # no request failed because of an outage
    results = read_result_file(clients[0], final.output_file_id)
    ids = [line["custom_id"] for line in results]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each custom_id exactly once
    assert final.request_counts.completed == len(lines) and final.request_counts.failed == 0
    assert seen.counts == sorted(seen.counts) and all(done <= len(lines) for done, _ in seen.counts)
    assert all(failed == 0 for _, failed in seen.counts)
    sent = sent_per_request(standin, lines)
    repeated = sum(count - 1 for count in sent)
    # Only what was in flight or not yet stored when the database went can run again: a window of
    # each per replica per outage (a stack whose registry still answers, as OGX's may from its cache,
    # sends on until results wait for the store). The test allows one request more per replica and
    # outage: with four test workers on two cores, 41 and 82 came for bounds of 40 and 80.
    assert min(sent) >= 1 and repeated <= len(down_seconds) * REPLICAS * (2 * WINDOW + 1)
    assert all(serves_models(server) for server in replicas)  # the registry reconnected
    record(
        run_dir,
        "outages.json",
        f"database_restarts_{'_'.join(f'{down:g}s' for down in down_seconds)}",
        {
            "requests": len(lines),
            "repeated": repeated,
            "requests_by_times_sent": {str(times): sent.count(times) for times in sorted(set(sent))},
            "outages": outages,
            "retrieves_unanswered": seen.unanswered,
            "slowest_retrieve_s": round(seen.slowest, 1),
        },
    )


# Two kinds of partition: connections reset and refused (a firewall's reject), or packets lost with no
# error at all (a drop rule, a dead link), where only the renewals' own deadline tells the replica.
@pytest.mark.parametrize("partition", ["cut", "silence"], ids=["refused", "dropped"])
def test_a_replica_cut_off_from_the_database_stops_sending_and_the_other_runs_its_shards(
    replicas: list[ServerProcess], proxy: TcpProxy, standin: StandInControl, run_dir: Path, partition: str
) -> None:
    standin.configure(latency_mean=0.1)
    cut_off, reachable = (OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=30) for s in replicas)
    lines = chat_lines(800)
    batch = create_chat_batch(cut_off, lines)  # its job runs on the replica to be cut off
    wait_until(reachable, batch.id, 200)
    refused_before = proxy.refused
    getattr(proxy, partition)()  # longer than the lease (15 s): the cut-off replica's shards move to the other
    cut_at = time.monotonic()
    final = wait_for_end(reachable, batch.id, timeout=120)
    ended_after = time.monotonic() - cut_at
    time.sleep(max(0.0, 20.0 - ended_after))
    proxy.heal()
    healed_at = time.monotonic()
    serving = serves_models(replicas[0])  # through the provider's reconnect of the stack's kvstore

    assert final.status == "completed", final.errors
    assert final.error_file_id is None
    results = read_result_file(reachable, final.output_file_id)
    assert sorted(line["custom_id"] for line in results) == sorted(line["custom_id"] for line in lines)
    sent = sent_per_request(standin, lines)
    repeated = sum(count - 1 for count in sent)
    # What the cut-off replica had in flight or could not store runs again: its window plus the
    # results it may hold unstored (a window), never what it would send until its lease ran out
    # (67 in one run without that bound).
    assert min(sent) >= 1 and repeated <= 3 * WINDOW
    assert serving
    time.sleep(3.0)  # after the partition: nothing of the batch is sent again
    assert sent_per_request(standin, lines) == sent
    record(
        run_dir,
        "outages.json",
        f"replica_cut_off_20s_{partition}",
        {
            "requests": len(lines),
            "repeated": repeated,
            "ended_after_cut_s": round(ended_after, 1),
            "serving_after_heal_s": round(time.monotonic() - healed_at, 1),
            "connections_refused": proxy.refused - refused_before,
        },
    )


@pytest.fixture
def files_volume(run_dir: Path) -> Iterator[tuple[Path, Callable[[bool], None]]]:
    """A state directory whose files volume can be made read-only (True) and writable again (False)."""
    state = run_dir / f"files-outage-{uuid.uuid4().hex[:6]}"
    try:
        with tmpfs_volume(state / "files") as read_only:
            yield state, read_only
    except CannotMountError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")


def test_a_files_outage_across_finalization_is_waited_out_and_the_files_appear(
    run_dir: Path,
    standin_server: ServerProcess,
    standin: StandInControl,
    files_volume: tuple[Path, Callable[[bool], None]],
) -> None:
    state, read_only = files_volume
    # One failure would end the batch: the outage must not be counted as one.
    stack = start_stack(run_dir, state, f"{standin_server.url}/v1", {"BATCHES_MAX_JOB_ATTEMPTS": "1"})
    try:
        warm_up(stack)
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=30)
        standin.configure(latency_mean=0.05)
        lines = chat_lines(300)
        batch = create_chat_batch(client, lines)
        # Well before the end: the results go to the database, the files only once all are in, and a
        # batch of 300 at 50 ms and window 10 takes about 1.5 s.
        wait_until(client, batch.id, 50)
        read_only(True)  # the files volume goes read-only before the batch's files are written
        seen = []
        for _ in range(50):  # 5 s: the batch waits, with its true counts, and ends neither way
            current = client.batches.retrieve(batch.id)
            seen.append((current.status, current.request_counts.completed))
            time.sleep(0.1)
        read_only(False)
        back_at = time.monotonic()
        final = wait_for_end(client, batch.id, timeout=60)
        ended_after = time.monotonic() - back_at
        results = read_result_file(client, final.output_file_id) if final.output_file_id else []
    finally:
        stack.stop()
    assert {status for status, _ in seen} <= {"in_progress", "finalizing"} and seen[-1] == ("finalizing", 300)
    assert final.status == "completed", final.errors
    assert final.request_counts.completed == 300 and final.error_file_id is None
    assert sorted(line["custom_id"] for line in results) == sorted(line["custom_id"] for line in lines)
    record(
        run_dir, "outages.json", "files_read_only_5s", {"requests": 300, "ended_after_return_s": round(ended_after, 1)}
    )
