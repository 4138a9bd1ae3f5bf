"""Run batch workloads through a real stack, once with this provider and once with llama-stack's
built-in `inline::reference`, and print the figures side by side, with the machine's limit beside
them: the same requests sent by a plain `openai.AsyncOpenAI` client straight to the same stand-in,
as many at once as the batch's window ("plain").

    .venv/bin/python bench/compare.py                              # every workload, both providers, plain
    .venv/bin/python bench/compare.py --workloads latency,cpu --providers ours
    .venv/bin/python bench/compare.py --workloads latency,failures --chart docs/images/compare.png

Workloads (requests go to the stand-in model server, started here):
    latency      600 chat requests, log-normal latency (mean 200 ms, sigma 0.6), concurrency 10;
                 compared with the ideal N x mean latency / concurrency (the mean of the latencies
                 the stand-in drew, which the seed fixes: 0.1926 s), and with a perfect sliding
                 window over the same latency draws ("of perfect"); the time split into start (create
                 to the first request at the model), run (to its last answer) and end (to `completed`)
    failures     the latency workload with 10% of the stand-in's answers replaced by HTTP 503
    cpu          2,000 chat requests at zero latency, concurrency 10: requests per second
    concurrency  1,000 requests, mean latency 1 s (sigma 0.6), concurrency 64; against the ideal
    memory       50,000 requests of about 1 KB each at zero latency, concurrency 10: the server's peak
                 RSS growth, and the latency of /v1/health polled every 50 ms while the batch runs
Each (provider, workload) pair gets a fresh stack and state directory, and the stand-in's latency
draws restart from one seed: every column of a workload meets the same latencies in the same order.
Under each table: this provider's rate against the built-in's and against the plain client's.
"""

import argparse
import asyncio
import heapq
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
from openai import AsyncOpenAI, OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.harness import RUN_YAML, ServerProcess, StandInControl, start_stack, start_standin, warm_up


@dataclass(frozen=True)
class Workload:
    name: str
    requests: int
    concurrency: int
    latency_mean: float = 0.0
    latency_sigma: float = 0.0
    line_bytes: int = 0  # pad each request's prompt to about this size
    fail_503: float = 0.0  # share of answers the stand-in replaces with HTTP 503
    timeout: float = 1800.0

    @property
    def ideal_seconds(self) -> float | None:
        return self.requests * self.latency_mean / self.concurrency if self.latency_mean else None


WORKLOADS = {
    "latency": Workload("latency", 600, 10, latency_mean=0.2, latency_sigma=0.6),
    "failures": Workload("failures", 600, 10, latency_mean=0.2, latency_sigma=0.6, fail_503=0.1),
    "cpu": Workload("cpu", 2000, 10),
    "concurrency": Workload("concurrency", 1000, 64, latency_mean=1.0, latency_sigma=0.6),
    "memory": Workload("memory", 50_000, 10, line_bytes=1000, timeout=3600),
}


@dataclass
class Result:
    provider: str
    workload: str
    status: str = ""
    seconds: float = 0.0
    completed: int = 0
    failed: int = 0
    requests_per_second: float = 0.0
    share_of_ideal: float | None = None
    rss_growth_mb: float | None = None
    rss_growth_mb_by_phase: dict[str, float] = field(default_factory=dict)
    input_mb: float | None = None
    health_p99_ms: float | None = None
    retrieve_p99_ms: float | None = None
    health_max_ms: float | None = None
    health_samples: int = 0
    notes: list[str] = field(default_factory=list)
    # Where the time of a latency-bound run went, from the stand-in's clock (same machine): from create to
    # the first request reaching the model, from there to the last answer, and from it to `completed`.
    start_s: float | None = None
    run_s: float | None = None
    end_s: float | None = None
    perfect_run_s: float | None = None  # a perfect sliding window over the same draws, in arrival order
    draws_mean_s: float | None = None  # the mean latency the stand-in drew for this run
    share_of_perfect: float | None = None  # perfect_run_s / seconds: against the best any window could do
    # (seconds since create, requests finished) at each poll: the chart's curve
    progress: list[tuple[float, int]] = field(default_factory=list)


def builtin_run_yaml(directory: Path, base: Path = RUN_YAML) -> Path:
    """A run.yaml without the `module:` line and the settings only this provider knows (the built-in
    one runs one batch at a time, its default: run.yaml leaves `max_concurrent_batches` unset)."""
    upstream_settings = ("kvstore:", "max_concurrent_requests_per_batch:")
    kept = [
        line
        for line in base.read_text().splitlines()
        if "module: llama_stack_provider_batches" not in line
        and ("${env.BATCHES_" not in line or line.strip().startswith(upstream_settings))
    ]
    path = directory / f"{base.stem}-builtin.yaml"
    path.write_text("\n".join(kept) + "\n")
    return path


def input_lines(workload: Workload) -> bytes:
    rows = []
    for n in range(workload.requests):
        content = f"question {n}"
        if workload.line_bytes:
            content += " " + "x" * max(0, workload.line_bytes - 150)
        body = {"model": "local/m-chat", "messages": [{"role": "user", "content": content}]}
        rows.append(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(rows) + "\n").encode()


def rss_bytes(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Polls /v1/health and the server's RSS while a batch runs."""

    def __init__(self, stack: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.stop = threading.Event()
        self.health_ms: list[float] = []
        self.peak_rss = rss_bytes(stack.process.pid)
        self.phase = "validating"  # the batch status last seen by the poller
        self.peak_rss_by_phase: dict[str, int] = {}

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    client.get(f"{self.stack.url}/v1/health")
                    self.health_ms.append((time.perf_counter() - started) * 1000)
                except httpx.HTTPError:
                    self.health_ms.append(60_000)
                rss = rss_bytes(self.stack.process.pid)
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_rss_by_phase[self.phase] = max(self.peak_rss_by_phase.get(self.phase, 0), rss)
                time.sleep(0.05)


DRAWS_SEED = 20261207  # every run of a workload gets the same latency draws, in the same order


def perfect_window(latencies: list[float], window: int) -> float:
    """How long `latencies` take, in this order, through a sliding window of `window` with no overhead:
    each request starts the instant a slot frees."""
    slots = [0.0] * window
    for latency in latencies:
        heapq.heapreplace(slots, slots[0] + latency)
    return max(slots)


def record_phases(result: Result, standin: StandInControl, created_at: float, ended_at: float, window: int) -> None:
    """Split a run's time into start, run and end at the stand-in's first request and last answer."""
    stats = standin.stats(latencies=True)
    first, last, latencies = stats["first_request_at"], stats["last_response_at"], stats["latencies"]
    if first is None or last is None or not latencies:
        return
    result.start_s = round(first - created_at, 2)
    result.run_s = round(last - first, 2)
    result.end_s = round(ended_at - last, 2)
    result.perfect_run_s = round(perfect_window(latencies, window), 2)
    result.draws_mean_s = round(sum(latencies) / len(latencies), 4)
    if result.seconds:
        result.share_of_perfect = round(result.perfect_run_s / result.seconds, 3)
        # The ideal N x mean latency / window, with the mean these draws have rather than the nominal one.
        result.share_of_ideal = round(len(latencies) * result.draws_mean_s / window / result.seconds, 3)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_one(provider: str, workload: Workload, standin: ServerProcess, work_dir: Path) -> Result:
    result = Result(provider, workload.name)
    StandInControl(standin.url).configure(
        latency_mean=workload.latency_mean, latency_sigma=workload.latency_sigma, fail_503=workload.fail_503, fail_429=0
    )
    run_yaml = RUN_YAML if provider == "ours" else builtin_run_yaml(work_dir)
    state = Path(tempfile.mkdtemp(prefix=f"{provider}-{workload.name}-", dir=work_dir))
    env = {"BATCHES_MAX_CONCURRENT_REQUESTS": str(workload.concurrency)}
    stack = start_stack(work_dir, state, f"{standin.url}/v1", env, run_yaml=run_yaml)
    try:
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=600)
        warm_up(stack)
        content = input_lines(workload)
        result.input_mb = round(len(content) / 2**20, 1)
        file_id = client.files.create(file=("bench.jsonl", content), purpose="batch").id
        del content
        sampler = Sampler(stack)
        baseline_rss = sampler.peak_rss
        sampler.start()
        StandInControl(standin.url).reset(seed=DRAWS_SEED)
        created_at = time.time()
        started = time.perf_counter()
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = started + workload.timeout
        retrieve_ms: list[float] = []
        while batch.status not in ("completed", "failed", "expired", "cancelled") and time.perf_counter() < deadline:
            time.sleep(0.1)
            try:
                asked = time.perf_counter()
                batch = client.batches.retrieve(batch.id)
                retrieve_ms.append((time.perf_counter() - asked) * 1000)
                sampler.phase = batch.status
                counts = batch.request_counts
                finished = counts.completed + counts.failed if counts else 0
                result.progress.append((round(asked - started, 2), finished))
            except Exception as exc:  # a frozen server times out: keep polling
                result.notes.append(f"retrieve failed: {type(exc).__name__}")
        result.seconds = round(time.perf_counter() - started, 2)
        ended_at = time.time()
        sampler.stop.set()
        sampler.join()
        if workload.latency_mean:
            record_phases(result, StandInControl(standin.url), created_at, ended_at, workload.concurrency)
        result.status = batch.status
        if batch.request_counts:
            result.completed, result.failed = batch.request_counts.completed, batch.request_counts.failed
        result.requests_per_second = round(result.completed / result.seconds, 1) if result.seconds else 0.0
        if workload.ideal_seconds and result.share_of_ideal is None:  # no draws recorded: the nominal ideal
            result.share_of_ideal = round(workload.ideal_seconds / result.seconds, 3)
        result.rss_growth_mb = round((sampler.peak_rss - baseline_rss) / 2**20, 1)
        result.rss_growth_mb_by_phase = {
            phase: round((peak - baseline_rss) / 2**20, 1) for phase, peak in sampler.peak_rss_by_phase.items()
        }
        if retrieve_ms:
            result.retrieve_p99_ms = round(percentile(retrieve_ms, 0.99), 1)
        if sampler.health_ms:
            result.health_p99_ms = round(percentile(sampler.health_ms, 0.99), 1)
            result.health_max_ms = round(max(sampler.health_ms), 1)
            result.health_samples = len(sampler.health_ms)
    finally:
        stack.stop()
    return result


async def send_plainly(workload: Workload, base_url: str) -> tuple[int, int]:
    """Send the workload's requests straight to the model server, `concurrency` at a time: (completed, failed)."""
    # The stand-in's own model id: the stack's `local/m-chat` is `m-chat` of its provider `local`.
    bodies = [{**json.loads(line)["body"], "model": "m-chat"} for line in input_lines(workload).splitlines()]
    pending = iter(bodies)
    counts = {"completed": 0, "failed": 0}

    async def sender(client: AsyncOpenAI) -> None:
        for body in pending:
            try:
                await client.chat.completions.create(**body)
                counts["completed"] += 1
            except Exception:
                counts["failed"] += 1

    async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600) as client:
        await asyncio.gather(*(sender(client) for _ in range(workload.concurrency)))
    return counts["completed"], counts["failed"]


def run_plain(workload: Workload, standin: ServerProcess) -> Result:
    """The machine's limit for `workload`: no stack, no batch, the same requests and concurrency."""
    result = Result("plain", workload.name, status="completed")
    StandInControl(standin.url).configure(
        latency_mean=workload.latency_mean, latency_sigma=workload.latency_sigma, fail_503=workload.fail_503, fail_429=0
    )
    StandInControl(standin.url).reset(seed=DRAWS_SEED)
    created_at = time.time()
    started = time.perf_counter()
    result.completed, result.failed = asyncio.run(send_plainly(workload, f"{standin.url}/v1"))
    result.seconds = round(time.perf_counter() - started, 2)
    if workload.latency_mean:
        record_phases(result, StandInControl(standin.url), created_at, time.time(), workload.concurrency)
    result.requests_per_second = round(result.completed / result.seconds, 1)
    if workload.ideal_seconds and result.share_of_ideal is None:
        result.share_of_ideal = round(workload.ideal_seconds / result.seconds, 3)
    return result


def ratios(rows: list[Result]) -> str:
    """This provider's rate against the others', for the line under a table."""
    rates = {r.provider: r.requests_per_second for r in rows if r.status == "completed"}
    if not rates.get("ours"):
        return ""
    ours = rates["ours"]
    parts = [f"ours / {other} = {ours / rate:.2f}" for other, rate in rates.items() if other != "ours" and rate]
    return "  rate: " + ", ".join(parts) if parts else ""


def print_table(results: list[Result], workloads: list[Workload]) -> None:
    columns = [
        ("status", "status"),
        ("seconds", "seconds"),
        ("completed", "completed"),
        ("failed", "failed"),
        ("requests_per_second", "req/s"),
        ("share_of_ideal", "of ideal"),
        ("share_of_perfect", "of perfect"),
        ("start_s", "start s"),
        ("run_s", "run s"),
        ("perfect_run_s", "perfect run s"),
        ("end_s", "end s"),
        ("draws_mean_s", "draws mean s"),
        ("rss_growth_mb", "RSS +MB"),
        ("health_p99_ms", "health p99 ms"),
        ("health_max_ms", "health max ms"),
        ("retrieve_p99_ms", "retrieve p99 ms"),
    ]
    for workload in workloads:
        ideal = f", ideal {workload.ideal_seconds:.1f} s" if workload.ideal_seconds else ""
        print(f"\n{workload.name}: {workload.requests} requests, concurrency {workload.concurrency}{ideal}")
        rows = [r for r in results if r.workload == workload.name]
        print(f"  {'':<14}" + "".join(f"{r.provider:>16}" for r in rows))
        for attribute, label in columns:
            print(f"  {label:<14}" + "".join(f"{getattr(r, attribute)!s:>16}" for r in rows))
        if line := ratios(rows):
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--providers", default="ours,builtin,plain", help="ours, builtin, plain (no stack)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--timeout", type=float, help="give up on a batch after this many seconds")
    parser.add_argument("--chart", type=Path, help="also draw requests finished over time here (PNG; needs matplotlib)")
    args = parser.parse_args()
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    if args.timeout:
        workloads = [replace(workload, timeout=args.timeout) for workload in workloads]
    providers = args.providers.split(",")

    work_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    standin = start_standin(work_dir)
    results: list[Result] = []
    try:
        for workload in workloads:
            for provider in providers:
                print(f"running {workload.name} on {provider}...", flush=True)
                if provider == "plain":
                    results.append(run_plain(workload, standin))
                else:
                    results.append(run_one(provider, workload, standin, work_dir))
                figures = {k: v for k, v in asdict(results[-1]).items() if k != "progress"}
                print(f"  {figures}", flush=True)
    finally:
        standin.stop()
    print_table(results, workloads)
    if args.chart:
        from bench.chart import draw_progress  # matplotlib only when a chart is asked for

        draw_progress(results, workloads, args.chart)
        print(f"\nchart: {args.chart}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"\nlogs: {work_dir}")


if __name__ == "__main__":
    main()
