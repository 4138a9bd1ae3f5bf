"""Submit small batches to a running stack with the OpenAI SDK, follow them, and print the results:
chat completions, then Responses and moderations where the stack serves them.

make demo        (the stack of `make run` on 127.0.0.1:$PORT, 8321 by default; LLAMA_STACK_URL, a
                  whole URL, points elsewhere; DEMO_MODEL chooses the chat model)

A stack it cannot reach, or that refuses it, is one line on stderr and exit status 1.
"""

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import openai
from openai import OpenAI
from openai.types import Batch

QUESTIONS = [
    "What is the capital of France?",
    "Name a prime number greater than 10.",
    "What colour is the sky on a clear day?",
]
STANDIN_MODELS = {"local/m-chat", "local/m-embed", "local/m-guard"}
TEXTS_TO_MODERATE = ["A recipe for lemon cake.", "How do I build a bomb?"]


def run_batch(client: OpenAI, endpoint: str, bodies: list[dict[str, Any]]) -> Batch:
    """Upload `bodies` as a batch input file, create the batch, and follow it to its end."""
    lines = [{"custom_id": f"line-{n}", "method": "POST", "url": endpoint, "body": b} for n, b in enumerate(bodies)]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    input_file = client.files.create(file=("demo.jsonl", content), purpose="batch")
    key = f"demo-{uuid.uuid4().hex}"
    batch = client.batches.create(
        input_file_id=input_file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"source": "make demo"},
        extra_body={"idempotency_key": key},  # a retry with this key returns this same batch
    )
    print(f"\n{endpoint}: created {batch.id} over {input_file.id} (idempotency key {key})")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        print(f"  {batch.status:<11} {counts.completed} done, {counts.failed} failed of {counts.total}")
    if batch.status == "failed":
        for error in batch.errors.data:
            print(f"  line {error.line}: {error.code}: {error.message}")
        sys.exit(1)
    if batch.error_file_id:
        print(f"  error file {batch.error_file_id}:\n{client.files.content(batch.error_file_id).text}")
    return batch


def results(client: OpenAI, batch: Batch) -> list[tuple[str, dict[str, Any]]]:
    """(custom_id, response body) of each successful request."""
    if not batch.output_file_id:
        return []
    lines = [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]
    return [(line["custom_id"], line["response"]["body"]) for line in lines]


def response_text(body: dict[str, Any]) -> str:
    return "".join(
        part.get("text", "") for item in body["output"] if item["type"] == "message" for part in item["content"]
    )


def stack_url(port: int) -> str:
    """The stack to talk to: LLAMA_STACK_URL if set, else the one `make run` serves on `port` (on STACK_HOST,
    as serve.py binds it, unless that means every address)."""
    if os.environ.get("LLAMA_STACK_URL"):
        return os.environ["LLAMA_STACK_URL"].rstrip("/")
    host = os.environ.get("STACK_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8321), help="the port of `make run`")
    url = stack_url(parser.parse_args().port)
    try:
        demo(OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("LLAMA_STACK_API_KEY", "none")))
    except openai.APIConnectionError:  # APITimeoutError too: the SDK's own retries have been used up
        sys.exit(
            f"error: cannot reach the stack at {url}: is `make run` serving there? "
            "(PORT=<port> make demo for another port of `make run`, LLAMA_STACK_URL=<url> for another stack)"
        )
    except openai.APIStatusError as refusal:
        sys.exit(f"error: the stack at {url} answered {refusal.status_code}: {' '.join(refusal.message.split())}")


def demo(client: OpenAI) -> None:
    """Chat completions with the first chat model the stack serves, then Responses and moderations."""
    llms = [
        m.id for m in client.models.list() if (getattr(m, "custom_metadata", None) or {}).get("model_type") == "llm"
    ]
    chat_models = [m for m in llms if "guard" not in m]  # a guard model classifies; it does not chat
    # run.yaml registers the stand-in's models whatever the backend; the backend's own are listed as
    # local/<id> on their own, and are the ones that answer when MODEL_URL names a real server.
    served = [m for m in chat_models if m not in STANDIN_MODELS] or chat_models
    model = os.environ.get("DEMO_MODEL") or (served[0] if served else sys.exit("the stack lists no llm model"))
    print(f"model {model}")

    chat = [{"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 64} for q in QUESTIONS]
    for custom_id, body in results(client, run_batch(client, "/v1/chat/completions", chat)):
        print(f"  {custom_id}: {body['choices'][0]['message']['content']}")

    try:
        responses = [{"model": model, "input": q, "instructions": "Answer in one sentence."} for q in QUESTIONS]
        for custom_id, body in results(client, run_batch(client, "/v1/responses", responses)):
            print(f"  {custom_id}: {body['id']} {body['status']}: {' '.join(response_text(body).split())}")
        moderations = [{"input": text} for text in TEXTS_TO_MODERATE]  # no model: the stack's default shield
        batch = run_batch(client, "/v1/moderations", moderations)
        for custom_id, body in results(client, batch):
            flagged = [name for name, hit in (body["results"][0].get("categories") or {}).items() if hit]
            print(f"  {custom_id}: flagged={body['results'][0]['flagged']} {', '.join(flagged)}")
    except openai.BadRequestError as refused:  # a stack without the Responses or Safety API
        print(f"  refused: {refused.message}")


if __name__ == "__main__":
    main()
