import json

from llama_stack_provider_batches import formats


def test_success_line_has_openai_shape_with_body_as_object() -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "text": 'a "quoted"\nline'}
    text = formats.success_line('req-"1"', json.dumps(body), request_id="req_abc")
    line = json.loads(text)
    assert line["custom_id"] == 'req-"1"'
    assert line["id"].startswith("batch_req_")
    assert line["error"] is None
    assert line["response"] == {"status_code": 200, "request_id": "req_abc", "body": body}
    assert "\n" not in text


def test_http_error_line_carries_status_and_error_object() -> None:
    line = json.loads(formats.http_error_line("req-2", 400, {"message": "bad", "code": "invalid"}))
    assert line["response"]["status_code"] == 400
    assert line["response"]["request_id"].startswith("req_")
    assert line["response"]["body"] == {"error": {"message": "bad", "type": None, "param": None, "code": "invalid"}}
    assert line["error"] is None


def test_failure_line_has_no_response() -> None:
    line = json.loads(formats.failure_line("req-3", "timeout", "too slow"))
    assert line["response"] is None
    assert line["error"] == {"code": "timeout", "message": "too slow"}


def test_expired_line_uses_openais_code() -> None:
    line = json.loads(formats.expired_line("req-4"))
    assert line["response"] is None
    assert line["error"]["code"] == "batch_expired"


def test_line_ids_are_unique() -> None:
    assert len({json.loads(formats.success_line("x", "{}"))["id"] for _ in range(100)}) == 100


def test_token_usage_of_chat_and_embedding_bodies() -> None:
    assert formats.token_usage({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}) == (3, 4)
    assert formats.token_usage({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == (5, 0)
    assert formats.token_usage({}) == (0, 0)
