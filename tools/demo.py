"""Submit a small batch to a running stack with the OpenAI SDK, follow it, and print the results.

make demo        (the stack from `make run` on 127.0.0.1:8321; LLAMA_STACK_URL to point elsewhere)
"""

import json
import os
import sys
import time
import uuid

from openai import OpenAI

QUESTIONS = [
    "What is the capital of France?",
    "Name a prime number greater than 10.",
    "What colour is the sky on a clear day?",
]


def main() -> None:
    base_url = os.environ.get("LLAMA_STACK_URL", "http://127.0.0.1:8321").rstrip("/") + "/v1"
    client = OpenAI(base_url=base_url, api_key=os.environ.get("LLAMA_STACK_API_KEY", "none"))
    models = [m for m in client.models.list() if (getattr(m, "custom_metadata", None) or {}).get("model_type") == "llm"]
    model = os.environ.get("DEMO_MODEL") or (models[0].id if models else sys.exit("the stack lists no llm model"))

    lines = [
        {
            "custom_id": f"question-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 64},
        }
        for n, question in enumerate(QUESTIONS)
    ]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    input_file = client.files.create(file=("demo.jsonl", content), purpose="batch")
    key = f"demo-{uuid.uuid4().hex}"
    batch = client.batches.create(
        input_file_id=input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"source": "make demo"},
        extra_body={"idempotency_key": key},  # a retry with this key returns this same batch
    )
    print(f"created {batch.id} over {input_file.id} with model {model} (idempotency key {key})")

    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        print(f"  {batch.status:<11} {counts.completed} done, {counts.failed} failed of {counts.total}")

    if batch.status == "failed":
        for error in batch.errors.data:
            print(f"  line {error.line}: {error.code}: {error.message}")
        sys.exit(1)
    if batch.output_file_id:
        print(f"\noutput file {batch.output_file_id}:")
        for raw in client.files.content(batch.output_file_id).text.splitlines():
            result = json.loads(raw)
            answer = result["response"]["body"]["choices"][0]["message"]["content"]
            print(f"  {result['custom_id']}: {answer}")
    if batch.error_file_id:
        print(f"\nerror file {batch.error_file_id}:")
        print(client.files.content(batch.error_file_id).text)


if __name__ == "__main__":
    main()
