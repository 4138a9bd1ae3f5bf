"""What estimating input tokens costs (`max_enqueued_tokens_per_user`): 50,000 chat lines validated by
a real stack with the token quota set and without it, side by side with the machine's limit.

    .venv/bin/python bench/token_estimates.py                  # 50,000 lines of about 1 KB
    .venv/bin/python bench/token_estimates.py --lines 10000 --words 20

Figures:
    tiktoken alone      encoding every line's text with cl100k_base, one thread, nothing else (the limit)
    estimate in process parse_input with and without the estimator, in this process: the estimate's cost
    stack: validation   from `batches.create` to the batch's first poll (every 50 ms) in `in_progress`,
                        quota unset (no estimate) and set (estimated, then admitted within one transaction)
    stack: health lag   /v1/health latency, p50 / p99 / max, polled every 20 ms during that validation:
                        the serving loop's lag while the estimate runs in a thread
The batch is cancelled once it is in progress: its requests are not the point here.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama_stack_provider_batches.requests.input_file import parse_input
from llama_stack_provider_batches.requests.token_estimates import body_estimator, text_counter
from tools.harness import StandInControl, start_stack, start_standin, warm_up
from tools.tiktoken_cache import ensure_cache

CHAT = "/v1/chat/completions"
WORDS = ("batch", "token", "model", "request", "answer", "quota", "window", "shard", "lease", "result")


def input_file(lines: int, words: int) -> bytes:
    """`lines` chat requests, each a system and a user message of about `words` words in all."""
    rows = []
    for i in range(lines):
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] + str(j % 13) for j in range(words))
        body = {
            "model": "local/m-chat",
            "messages": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": text}],
        }
        rows.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": body}))
    return "\n".join(rows).encode()


def in_process(content: bytes) -> dict[str, float]:
    count = text_counter()
    texts = [m["content"] for line in content.splitlines() for m in json.loads(line)["body"]["messages"]]
    started = time.perf_counter()
    for text in texts:
        count(text)
    tiktoken_alone = time.perf_counter() - started
    started = time.perf_counter()
    parse_input(content, CHAT)
    plain = time.perf_counter() - started
    started = time.perf_counter()
    parsed = parse_input(content, CHAT, body_estimator(CHAT, {}))
    estimated = time.perf_counter() - started
    return {
        "tiktoken_alone_s": round(tiktoken_alone, 2),
        "parse_s": round(plain, 2),
        "parse_and_estimate_s": round(estimated, 2),
        "tokens": sum(parsed.token_estimates),
    }


class HealthProbe(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.ms = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                client.get(f"{self.url}/v1/health")
                self.ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.02)


def through_stack(content: bytes, limit: int | None, work: Path, model_url: str) -> dict[str, float]:
    env = {"BATCHES_MAX_ENQUEUED_TOKENS_PER_USER": str(limit)} if limit else {}
    stack = start_stack(work, Path(tempfile.mkdtemp(dir=work)), model_url, env)
    try:
        warm_up(stack)
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
        file_id = client.files.create(file=("bench.jsonl", content), purpose="batch").id
        probe = HealthProbe(stack.url)
        probe.start()
        started = time.perf_counter()
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        while (batch := client.batches.retrieve(batch.id)).status == "validating":
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        probe.stop.set()
        probe.join()
        client.batches.cancel(batch.id)
        ms = sorted(probe.ms)
        return {
            "status": batch.status,
            "validation_s": round(seconds, 2),
            "health_p50_ms": round(statistics.median(ms), 1),
            "health_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
            "health_max_ms": round(ms[-1], 1),
            "estimate": (batch.model_extra or {}).get("estimated_input_tokens"),
        }
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--words", type=int, default=120, help="words per line (120: about 1 KB of JSON)")
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ensure_cache()))
    content = input_file(args.lines, args.words)
    print(f"{args.lines} chat lines, {len(content) / 2**20:.1f} MB", flush=True)
    local = in_process(content)
    print(f"in process: {local}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    standin = start_standin(work)
    try:
        StandInControl(standin.url).configure(latency_mean=0, latency_sigma=0, fail_503=0, fail_429=0)
        rows = {
            "quota unset": through_stack(content, None, work, f"{standin.url}/v1"),
            "quota set": through_stack(content, 10**12, work, f"{standin.url}/v1"),
        }
    finally:
        standin.stop()
    print(f"\n{'':22}{'quota unset':>14}{'quota set':>14}")
    for key in ("status", "validation_s", "health_p50_ms", "health_p99_ms", "health_max_ms", "estimate"):
        print(f"{key:22}{rows['quota unset'][key]!s:>14}{rows['quota set'][key]!s:>14}")
    per_line_us = (local["parse_and_estimate_s"] - local["parse_s"]) / args.lines * 1e6
    print(
        f"\nin this process: parse {local['parse_s']} s, parse and estimate {local['parse_and_estimate_s']} s"
        f" ({per_line_us:.0f} us per line for the estimate); tiktoken alone on the same texts"
        f" {local['tiktoken_alone_s']} s (the limit); {local['tokens']:,} tokens"
    )
    print(f"logs: {work}")


if __name__ == "__main__":
    main()
