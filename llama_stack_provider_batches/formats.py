"""The lines of output and error files, exactly as OpenAI writes them. Pure functions returning JSON text.

    success:         {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": {...}}, "error": null}
    HTTP error:      {"id", "custom_id", "response": {"status_code": 4xx/5xx, "request_id", "body": {"error": {...}}},
                      "error": null}
    no HTTP answer:  {"id", "custom_id", "response": null, "error": {"code", "message"}}

`body` is a JSON object, never a string holding JSON. Each line is one line of text: JSON escapes
every newline and tab inside strings.
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


def dumps(line: JsonObject) -> str:
    """One result line as compact JSON."""
    return json.dumps(line, separators=(",", ":"))


def success_line(custom_id: str, body_json: str, request_id: str | None = None) -> str:
    """An output-file line for a request the model answered; `body_json` is the response as JSON text.

    Built around the body's text, so a response is serialized once, by its own model.
    """
    head = dumps({"id": new_request_line_id(), "custom_id": custom_id})[:-1]
    request_id = json.dumps(request_id or new_request_id())
    return f'{head},"response":{{"status_code":200,"request_id":{request_id},"body":{body_json}}},"error":null}}'


def http_error_line(custom_id: str, status_code: int, error: JsonObject, request_id: str | None = None) -> str:
    """An error-file line for a request the backend refused with an HTTP status."""
    detail = {
        "message": str(error.get("message", "")),
        "type": error.get("type"),
        "param": error.get("param"),
        "code": error.get("code"),
    }
    response = {"status_code": status_code, "request_id": request_id or new_request_id(), "body": {"error": detail}}
    return dumps({"id": new_request_line_id(), "custom_id": custom_id, "response": response, "error": None})


def failure_line(custom_id: str, code: str, message: str) -> str:
    """An error-file line for a request that got no HTTP answer (connection lost, timeout, expiry...)."""
    error = {"code": code, "message": message}
    return dumps({"id": new_request_line_id(), "custom_id": custom_id, "response": None, "error": error})


def expired_line(custom_id: str) -> str:
    """An error-file line for a request the completion window closed on before it ran."""
    message = "This request could not be executed before the completion window expired."
    return failure_line(custom_id, "batch_expired", message)


def credentials_unavailable_line(custom_id: str) -> str:
    """An error-file line for a request left unrun by a restart, when the batch needs its creator's credentials."""
    message = (
        "This batch was created with per-request provider credentials, which are never stored; a server restart "
        "interrupted it before this request ran. Submit the remaining requests in a new batch."
    )
    return failure_line(custom_id, "credentials_unavailable", message)


def token_usage(body: JsonObject) -> tuple[int, int]:
    """(input, output) tokens of a response body, for chat, completion and embedding responses alike."""
    usage = body.get("usage") or {}
    input_tokens = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    output_tokens = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    return int(input_tokens), int(output_tokens)
