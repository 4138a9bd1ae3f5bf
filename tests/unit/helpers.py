"""Builders of batch input lines for unit tests."""

import json
from typing import Any

from llama_stack_api import BatchObject


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode()


def chat_line(custom_id: str, content: str = "hi", model: str = "local/m-chat") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }


def make_batch(batch_id: str = "batch_1", status: str = "validating", **fields: Any) -> BatchObject:
    """A batch object as the service would store it, with `fields` overriding the defaults."""
    defaults = {
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "created_at": 1,
    }
    return BatchObject(id=batch_id, status=status, **{**defaults, **fields})
