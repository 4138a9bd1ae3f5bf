import json

from llama_stack_provider_batches import formats


def test_success_line_has_openai_shape_with_body_as_object() -> None:
    line = formats.success_line("req-1", {"id": "chatcmpl-1", "object": "chat.completion"}, request_id="req_abc")
    assert line["custom_id"] == "req-1"
    assert line["id"].startswith("batch_req_")
    assert line["error"] is None
    assert line["response"] == {
        "status_code": 200,
        "request_id": "req_abc",
        "body": {"id": "chatcmpl-1", "object": "chat.completion"},
    }
    assert formats.is_success(line)


def test_http_error_line_carries_status_and_error_object() -> None:
    line = formats.http_error_line("req-2", 400, {"message": "bad", "code": "invalid"})
    assert line["response"]["status_code"] == 400
    assert line["response"]["body"] == {"error": {"message": "bad", "type": None, "param": None, "code": "invalid"}}
    assert line["error"] is None
    assert not formats.is_success(line)


def test_failure_line_has_no_response() -> None:
    line = formats.failure_line("req-3", "batch_expired", "too late")
    assert line["response"] is None
    assert line["error"] == {"code": "batch_expired", "message": "too late"}
    assert not formats.is_success(line)


def test_line_ids_are_unique() -> None:
    assert len({formats.success_line("x", {})["id"] for _ in range(100)}) == 100


def test_expired_line_uses_openais_code() -> None:
    line = formats.expired_line("req-4")
    assert line["response"] is None
    assert line["error"]["code"] == "batch_expired"


def test_dumps_is_one_line_that_round_trips() -> None:
    line = formats.success_line("a", {"text": "two\nlines\tand a tab"})
    text = formats.dumps(line)
    assert "\n" not in text and "\t" not in text
    assert json.loads(text) == line
