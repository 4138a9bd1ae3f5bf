"""The lines of output and error files, exactly as OpenAI writes them. Pure functions.

    success:         {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": {...}}, "error": null}
    HTTP error:      {"id", "custom_id", "response": {"status_code": 4xx/5xx, "request_id", "body": {"error": {...}}},
                      "error": null}
    no HTTP answer:  {"id", "custom_id", "response": null, "error": {"code", "message"}}

`body` is a JSON object, never a string holding JSON.
"""

import json
import uuid
from typing import Any

JsonObject = dict[str, Any]


def new_request_line_id() -> str:
    """An id for one line of a result file."""
    return f"batch_req_{uuid.uuid4().hex}"


def new_request_id() -> str:
    """An id standing for the backend's request id when it gave none."""
    return f"req_{uuid.uuid4().hex}"


def success_line(custom_id: str, body: JsonObject, request_id: str | None = None) -> JsonObject:
    """An output-file line for a request the model answered."""
    return {
        "id": new_request_line_id(),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id or new_request_id(), "body": body},
        "error": None,
    }


def http_error_line(custom_id: str, status_code: int, error: JsonObject, request_id: str | None = None) -> JsonObject:
    """An error-file line for a request the backend refused with an HTTP status."""
    detail = {
        "message": str(error.get("message", "")),
        "type": error.get("type"),
        "param": error.get("param"),
        "code": error.get("code"),
    }
    return {
        "id": new_request_line_id(),
        "custom_id": custom_id,
        "response": {
            "status_code": status_code,
            "request_id": request_id or new_request_id(),
            "body": {"error": detail},
        },
        "error": None,
    }


def failure_line(custom_id: str, code: str, message: str) -> JsonObject:
    """An error-file line for a request that got no HTTP answer (connection lost, timeout, expiry...)."""
    return {
        "id": new_request_line_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def expired_line(custom_id: str) -> JsonObject:
    """An error-file line for a request the completion window closed on before it ran."""
    return failure_line(
        custom_id, "batch_expired", "This request could not be executed before the completion window expired."
    )


def is_success(line: JsonObject) -> bool:
    """Whether a result line belongs in the output file rather than the error file."""
    response = line.get("response")
    return response is not None and response.get("status_code") == 200


def dumps(line: JsonObject) -> str:
    """One result line as compact JSON (no newline inside, so it is one line of a JSONL file)."""
    return json.dumps(line, separators=(",", ":"))
