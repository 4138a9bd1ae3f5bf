"""Submit small batches to a running stack with the OpenAI SDK, follow them, and print the results:
chat completions, then Responses and moderations where the stack serves them.

make demo        (the stack from `make run` on 127.0.0.1:8321; LLAMA_STACK_URL to point elsewhere,
                  DEMO_MODEL to choose the chat model)
"""

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


def main() -> None:
    base_url = os.environ.get("LLAMA_STACK_URL", "http://127.0.0.1:8321").rstrip("/") + "/v1"
    client = OpenAI(base_url=base_url, api_key=os.environ.get("LLAMA_STACK_API_KEY", "none"))
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
