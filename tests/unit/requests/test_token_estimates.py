"""The input-token estimator: exact on text chats against OpenAI's chat format, never negative, and
never lower when a request gains content."""

import functools
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_stack_provider_batches.requests.input_file import parse_input
from llama_stack_provider_batches.requests.token_estimates import (
    ATTACHMENT_TOKENS,
    IMAGE_TOKENS,
    REPLY_OVERHEAD,
    TextCounter,
    estimate_tokens,
    text_counter,
)
from tools.tiktoken_cache import ensure_cache

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def count() -> TextCounter:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ensure_cache()))
    return text_counter()


CHAT_SPECIALS = {"<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266}


@functools.cache
def chat_encoding() -> Any:
    """cl100k_base with the special tokens of OpenAI's chat format."""
    import tiktoken

    base = tiktoken.get_encoding("cl100k_base")
    return tiktoken.Encoding(
        "cl100k_im", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks, special_tokens=CHAT_SPECIALS
    )


def chat_format_tokens(messages: list[dict[str, str]]) -> int:
    """The tokenizer run over a conversation as OpenAI's chat models see it: each message
    `<|im_start|>{role}<|im_sep|>{content}<|im_end|>`, then `<|im_start|>assistant<|im_sep|>`."""
    text = "".join(f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages)
    return len(chat_encoding().encode(text + "<|im_start|>assistant<|im_sep|>", allowed_special=set(CHAT_SPECIALS)))


texts = st.text(st.characters(codec="utf-8", exclude_characters="<|>"), max_size=200)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(messages=messages)
def test_a_text_chat_is_counted_as_the_tokenizer_counts_its_chat_format(
    count: TextCounter, messages: list[dict[str, str]]
) -> None:
    assert estimate_tokens(CHAT, {"model": "m", "messages": messages}, count) == chat_format_tokens(messages)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(
    st.sampled_from(["model", "messages", "prompt", "input", "instructions", "tools", "name"]), json_values
)
endpoints = st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations", "/v1/other"]
)


@settings(max_examples=300, deadline=None)
@given(endpoint=endpoints, body=bodies)
def test_any_body_gets_an_estimate_that_is_never_negative(count: TextCounter, endpoint: str, body: dict) -> None:
    assert estimate_tokens(endpoint, body, count) >= 0


@settings(max_examples=200, deadline=None)
@given(before=messages, added=messages, appended=texts)
def test_a_chat_never_costs_less_with_more_messages_or_longer_content(
    count: TextCounter, before: list[dict[str, str]], added: list[dict[str, str]], appended: str
) -> None:
    estimate = estimate_tokens(CHAT, {"messages": before}, count)
    assert estimate_tokens(CHAT, {"messages": before + added}, count) > estimate
    longer = [*before[:-1], {**before[-1], "content": before[-1]["content"] + appended}]
    assert estimate_tokens(CHAT, {"messages": longer}, count) >= estimate


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(texts, max_size=5), more=texts)
def test_a_prompt_never_costs_less_with_more_text(count: TextCounter, prompts: list[str], more: str) -> None:
    for endpoint, field in (("/v1/completions", "prompt"), ("/v1/embeddings", "input")):
        estimate = estimate_tokens(endpoint, {field: prompts}, count)
        assert estimate == sum(count(p) for p in prompts)
        assert estimate_tokens(endpoint, {field: [*prompts, more]}, count) >= estimate


def test_token_arrays_count_their_length(count: TextCounter) -> None:
    assert estimate_tokens("/v1/completions", {"prompt": [1, 2, 3]}, count) == 3
    assert estimate_tokens("/v1/embeddings", {"input": [[1, 2], [3, 4, 5]]}, count) == 5
    assert estimate_tokens("/v1/embeddings", {"input": []}, count) == 0


def test_an_image_costs_a_fixed_price_and_text_parts_count_as_text(count: TextCounter) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}
    text = {"type": "text", "text": "What is in this picture?"}
    body: dict[str, Any] = {"messages": [{"role": "user", "content": [text, image]}]}
    plain: dict[str, Any] = {"messages": [{"role": "user", "content": text["text"]}]}
    assert estimate_tokens(CHAT, body, count) == estimate_tokens(CHAT, plain, count) + IMAGE_TOKENS


def test_tools_names_and_tool_calls_add_to_a_chat(count: TextCounter) -> None:
    message = {"role": "user", "content": "hi"}
    base = estimate_tokens(CHAT, {"messages": [message]}, count)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    assert estimate_tokens(CHAT, {"messages": [message], "tools": [tool]}, count) > base
    assert estimate_tokens(CHAT, {"messages": [{**message, "name": "ann"}]}, count) > base
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "lookup"}}]}
    assert estimate_tokens(CHAT, {"messages": [message, call]}, count) > base
    assert estimate_tokens(CHAT, {"messages": []}, count) == REPLY_OVERHEAD


def test_a_response_counts_its_instructions_and_input(count: TextCounter) -> None:
    as_string = estimate_tokens("/v1/responses", {"input": "Say hello", "instructions": "Be brief"}, count)
    as_item = estimate_tokens(
        "/v1/responses", {"input": [{"role": "user", "content": "Say hello"}], "instructions": "Be brief"}, count
    )
    assert as_string == as_item == count("Be brief") + 3 + count("user") + count("Say hello")


def test_files_and_audio_cost_a_fixed_price_never_their_base64(count: TextCounter) -> None:
    data = "QUJD" * 50_000  # 200 KB of base64
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{data}"}}
    audio = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    body = {"messages": [{"role": "user", "content": [pdf, audio]}]}
    assert estimate_tokens(CHAT, body, count) == estimate_tokens(CHAT, {"messages": [{"role": "user"}]}, count) + 170
    response_file = {"type": "input_file", "file_data": data}
    assert estimate_tokens("/v1/responses", {"input": [response_file]}, count) == ATTACHMENT_TOKENS


def test_an_estimator_that_fails_on_a_body_falls_back_to_the_lines_size() -> None:
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "hi"}}'

    def broken(_: dict) -> int:
        raise TypeError("unforeseen")

    parsed = parse_input(line, "/v1/embeddings", broken)
    assert not parsed.errors and list(parsed.token_estimates) == [len(line) // 4]


def test_moderations_naming_no_model_count_for_the_default_model() -> None:
    lines = b"\n".join(
        json.dumps({"custom_id": str(n), "method": "POST", "url": "/v1/moderations", "body": body}).encode()
        for n, body in enumerate([{"input": "a"}, {"input": "b", "model": "guard"}])
    )
    parsed = parse_input(lines, "/v1/moderations", lambda _: 7)
    parsed.model = "default-guard"  # as validation resolves it (input_reader.unknown_moderation_models)
    assert parsed.tokens_per_shard([(0, 1), (1, 2)]) == [{"default-guard": 7}, {"guard": 7}]
