"""A stand-in for an OpenAI-compatible model server (vLLM, Ollama...), for demos, tests and benchmarks.

It runs no model. Answers are deterministic functions of the request, so tests can check them:
chat and completion replies echo the prompt, embeddings are derived from a hash of the input.
Chat completions stream (server-sent events) when asked to, as the stack's Responses API asks. A
model whose id contains "guard" answers as Llama Guard does, for the stack's safety provider: "safe",
or "unsafe" and the category S9 when the text mentions a bomb.

Behaviour is set on the command line and can be changed while it runs (POST /admin/config):
    latency_mean, latency_sigma   seconds; log-normal latency with this mean (0 = answer at once)
    fail_503, fail_429             fraction of requests answered with that status
    retry_after                    seconds sent in Retry-After with 429s
Markers inside a prompt force an outcome for that request: `[[status:400]]` answers with that HTTP
status, `[[sleep:2.5]]` waits that many seconds first, `[[stall-once:5]]` waits that long only the
first time this prompt arrives (a backend that stalls once).

GET /admin/stats reports the requests received: in total, per path, and per prompt (to count repeats),
and when the first arrived and the last was answered (epoch seconds); with `?latencies=1`, also each
answered request's drawn latency, in the order they arrived (the last MAX_RECORDED_LATENCIES).
POST /admin/reset clears the counters; a JSON body {"seed": n} also restarts the latency draws from
seed n, so that runs compared side by side get the same draws in the same order.

    python tools/standin_model_server.py --port 8000 --latency-mean 0.2 --latency-sigma 0.6
"""

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MARKER = re.compile(r"\[\[(status|sleep|stall-once):([0-9.]+)\]\]")
DEFAULT_MODELS = ("m-chat", "m-embed", "m-guard")
MAX_RECORDED_LATENCIES = 100_000
EMBEDDING_DIMENSION = 8


@dataclass
class Behaviour:
    latency_mean: float = 0.0
    latency_sigma: float = 0.0
    fail_503: float = 0.0
    fail_429: float = 0.0
    retry_after: float = 1.0


class StandIn:
    """The server's state: its behaviour settings and its counters."""

    def __init__(self, behaviour: Behaviour, seed: int) -> None:
        self.behaviour = behaviour
        # Latencies and injected failures draw from two streams: the order in which requests arrive and
        # finish interleaves the two, and must not change which latencies a run gets.
        self.random = random.Random(seed)
        self.failures = random.Random(seed + 1)
        self.latencies: deque[float] = deque(maxlen=MAX_RECORDED_LATENCIES)  # drawn, in arrival order
        self.first_request_at: float | None = None
        self.last_response_at: float | None = None
        self.total = 0
        self.by_path: Counter[str] = Counter()
        self.by_prompt: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def latency(self) -> float:
        mean, sigma = self.behaviour.latency_mean, self.behaviour.latency_sigma
        if mean <= 0:
            return 0.0
        if sigma <= 0:
            return mean
        # A log-normal whose mean is `mean`: mu = ln(mean) - sigma^2 / 2.
        return self.random.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)

    def injected_failure(self) -> JSONResponse | None:
        draw = self.failures.random()
        if draw < self.behaviour.fail_503:
            return error_response(503, "The stand-in is overloaded (injected).", "server_error")
        if draw < self.behaviour.fail_503 + self.behaviour.fail_429:
            response = error_response(429, "Rate limit reached (injected).", "rate_limit_exceeded")
            response.headers["Retry-After"] = f"{self.behaviour.retry_after:g}"
            return response
        return None


def error_response(status: int, message: str, code: str) -> JSONResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}, status_code=status
    )


def prompt_of(path: str, body: dict[str, Any]) -> str:
    """The text a request is about, used for answers, markers and repeat counting."""
    if path.endswith("/chat/completions"):
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content")
            parts.append(content if isinstance(content, str) else str(content))
        return "\n".join(parts)
    if path.endswith("/completions"):
        return str(body.get("prompt", ""))
    return str(body.get("input", ""))


def usage(prompt: str, answer: str) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(prompt.split()), len(answer.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_reply(model: str, prompt: str) -> str:
    if "guard" in model:
        return "unsafe\nS9" if "bomb" in prompt.lower() else "safe"
    return f"stand-in reply to: {prompt}"


def chat_answer(model: str, prompt: str) -> dict[str, Any]:
    answer = chat_reply(model, prompt)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": usage(prompt, answer),
    }


def chat_stream(model: str, prompt: str, include_usage: bool) -> StreamingResponse:
    """The answer of chat_answer as server-sent chunks: the reply in two pieces, the finish, usage if asked."""
    answer = chat_reply(model, prompt)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time())}
    middle = len(answer) // 2
    deltas = [{"role": "assistant", "content": answer[:middle]}, {"content": answer[middle:]}]
    chunks = [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None} for delta in deltas]
    events = [{**head, "model": model, "choices": [choice]} for choice in chunks]
    events.append({**head, "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if include_usage:
        events.append({**head, "model": model, "choices": [], "usage": usage(prompt, answer)})

    async def send() -> Any:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(send(), media_type="text/event-stream")


def completion_answer(model: str, prompt: str) -> dict[str, Any]:
    answer = f"stand-in completion of: {prompt}"
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": answer, "finish_reason": "stop", "logprobs": None}],
        "usage": usage(prompt, answer),
    }


def embedding_answer(model: str, body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    texts = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, text in enumerate(texts):
        digest = hashlib.sha256(str(text).encode()).digest()
        vector = [round(byte / 255.0, 6) for byte in digest[:EMBEDDING_DIMENSION]]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(str(text).split()) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def build_app(state: StandIn, models: tuple[str, ...]) -> Starlette:
    async def list_models(_: Request) -> JSONResponse:
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "stand-in"} for m in models]
        return JSONResponse({"object": "list", "data": data})

    async def answer(request: Request) -> JSONResponse:
        path = request.url.path
        body = await request.json()
        prompt = prompt_of(path, body)
        state.total += 1
        state.by_path[path] += 1
        state.by_prompt[prompt] += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        state.first_request_at = state.first_request_at or time.time()
        try:
            forced_status = None
            delay = state.latency()
            for kind, value in MARKER.findall(prompt):
                if kind == "sleep" or (kind == "stall-once" and state.by_prompt[prompt] == 1):
                    delay = float(value)
                elif kind == "status":
                    forced_status = int(float(value))
            state.latencies.append(delay)
            if delay:
                await asyncio.sleep(delay)
            if forced_status is not None:
                return error_response(forced_status, f"Forced status {forced_status} (marker).", "forced")
            if failure := state.injected_failure():
                return failure
            model = body.get("model", "")
            if model not in models:
                return error_response(404, f"The model '{model}' does not exist.", "model_not_found")
            if path.endswith("/chat/completions") and body.get("stream") is True:
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return chat_stream(model, prompt, include_usage)
            if path.endswith("/chat/completions"):
                return JSONResponse(chat_answer(model, prompt))
            if path.endswith("/completions"):
                return JSONResponse(completion_answer(model, prompt))
            return JSONResponse(embedding_answer(model, body))
        finally:
            state.in_flight -= 1
            state.last_response_at = time.time()

    async def stats(request: Request) -> JSONResponse:
        answer = {
            "total": state.total,
            "by_path": dict(state.by_path),
            "by_prompt": dict(state.by_prompt),
            "in_flight": state.in_flight,
            "max_in_flight": state.max_in_flight,
            "behaviour": asdict(state.behaviour),
            "first_request_at": state.first_request_at,
            "last_response_at": state.last_response_at,
        }
        if request.query_params.get("latencies"):
            answer["latencies"] = list(state.latencies)
        return JSONResponse(answer)

    async def reset(request: Request) -> JSONResponse:
        body = await request.body()
        seed = json.loads(body).get("seed") if body else None
        if seed is not None:
            state.random.seed(int(seed))
            state.failures.seed(int(seed) + 1)
        state.total = 0
        state.by_path.clear()
        state.by_prompt.clear()
        state.latencies.clear()
        state.first_request_at = state.last_response_at = None
        state.max_in_flight = state.in_flight
        return JSONResponse({"reset": True})

    async def configure(request: Request) -> JSONResponse:
        changes = await request.json()
        for name, value in changes.items():
            if not hasattr(state.behaviour, name):
                return JSONResponse({"error": f"unknown setting {name!r}"}, status_code=400)
            setattr(state.behaviour, name, float(value))
        return JSONResponse(asdict(state.behaviour))

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "OK", "stand_in": True})

    return Starlette(
        routes=[
            Route("/v1/models", list_models),
            Route("/v1/chat/completions", answer, methods=["POST"]),
            Route("/v1/completions", answer, methods=["POST"]),
            Route("/v1/embeddings", answer, methods=["POST"]),
            Route("/admin/stats", stats),
            Route("/admin/reset", reset, methods=["POST"]),
            Route("/admin/config", configure, methods=["POST"]),
            Route("/health", health),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency-mean", type=float, default=0.0)
    parser.add_argument("--latency-sigma", type=float, default=0.0)
    parser.add_argument("--fail-503", type=float, default=0.0)
    parser.add_argument("--fail-429", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids")
    args = parser.parse_args()
    behaviour = Behaviour(args.latency_mean, args.latency_sigma, args.fail_503, args.fail_429, args.retry_after)
    app = build_app(StandIn(behaviour, args.seed), tuple(args.models.split(",")))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
