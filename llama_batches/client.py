"""Thin functions over the OpenAI SDK's Files and Batches APIs, and the one place where SDK errors
become a readable sentence (`CliError`)."""

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import openai
from openai import OpenAI
from openai.types import Batch

DEFAULT_BASE_URL = "http://127.0.0.1:8321/v1"
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
KEY_FIELD = "llama_batches_key"  # metadata: the idempotency key the batch was created with
FINGERPRINT_FIELD = "llama_batches_fingerprint"  # metadata: the key derived from content and parameters
SEARCH_BOUND = 500  # how many recent batches to look through for one created by the same command
POLL_FIRST_SECONDS = 0.25
POLL_MAX_SECONDS = 2.0
POLL_TIMEOUT_SECONDS = 30.0  # a batch's state is small: a poll that takes longer counts as a failed one
OUTAGE_FIRST_DELAY = 1.0  # between failed polls: doubled each time up to OUTAGE_MAX_DELAY
OUTAGE_MAX_DELAY = 30.0
OUTAGE_LIMIT_SECONDS = 300.0  # failing polls for this long end the follow (the batch keeps running)


class CliError(Exception):
    """A failure to report as one line on stderr, with exit status 2."""


@dataclass
class Connection:
    """Where the Batch API is, and an SDK client for it made on first use."""

    base_url: str
    api_key: str
    _client: OpenAI | None = field(default=None, repr=False)

    @property
    def client(self) -> OpenAI:
        if self._client is None:
            # Two retries (the SDK's default) ride out a blip; a 409 is never retried by servers that say so.
            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=120, max_retries=2)
        return self._client


def _server_message(error: openai.APIStatusError) -> str:
    """The message of the server's error object, whatever shape it came in."""
    body = error.body
    if isinstance(body, Mapping):
        for name in ("message", "detail", "error"):
            value = body.get(name)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, Mapping) and isinstance(value.get("message"), str):
                return value["message"]
    if isinstance(body, str) and body:
        return body
    return error.message


def describe(error: openai.OpenAIError, base_url: str, key: str | None = None) -> str:
    """One sentence saying what went wrong with a call to the server at `base_url`."""
    if isinstance(error, openai.APITimeoutError):
        return f"{base_url} did not answer in time: is the server overloaded or the network slow?"
    if isinstance(error, openai.APIConnectionError):
        return f"cannot reach {base_url}: is the server running?"
    if not isinstance(error, openai.APIStatusError):
        return str(error)
    message = " ".join(_server_message(error).split())[:500]  # one line, bounded
    details = ", ".join(f"{name}: {value}" for name, value in (("code", error.code), ("param", error.param)) if value)
    suffix = f" ({details})" if details else ""
    if isinstance(error, openai.ConflictError) and (
        error.param == "idempotency_key" or error.code == "idempotency_key_reused" or "dempotency" in message
    ):
        named = f" '{key}'" if key else ""
        return (
            f"the idempotency key{named} was already used with other parameters (server said: {message}); "
            "pick another key with --key KEY to start a separate batch"
        )
    if isinstance(error, openai.AuthenticationError):
        return f"the server refused the API key (401: {message}); pass --api-key or set OPENAI_API_KEY"
    return f"the server answered {error.status_code}: {message}{suffix}"


@contextmanager
def readable_errors(base_url: str, key: str | None = None) -> Iterator[None]:
    """Turn SDK errors raised inside into a CliError with one readable sentence."""
    try:
        yield
    except openai.OpenAIError as error:
        raise CliError(describe(error, base_url, key)) from error


def upload(client: OpenAI, name: str, content: bytes) -> str:
    """Upload a batch input file; its file id."""
    return client.files.create(file=(name, content), purpose="batch").id


def create(
    client: OpenAI, input_file_id: str, endpoint: str, completion_window: str, metadata: Mapping[str, str], key: str
) -> Batch:
    """Create a batch under an idempotency key (a body field, as this stack and llama-stack read it).

    A server that does not know the field (OpenAI's own) refuses it with a 400 naming it: then the
    batch is created without it, and the key in the metadata still lets a later run find it.
    """
    parameters: dict[str, Any] = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,  # any endpoint the server serves, not only those the SDK lists
        "completion_window": completion_window,
        "metadata": dict(metadata),
    }
    try:
        return client.batches.create(**parameters, extra_body={"idempotency_key": key})
    except openai.BadRequestError as error:
        if error.param != "idempotency_key" and "Unrecognized request argument" not in error.message:
            raise
    return client.batches.create(**parameters)


def retrieve(client: OpenAI, batch_id: str) -> Batch:
    return client.batches.retrieve(batch_id)


def cancel(client: OpenAI, batch_id: str) -> Batch:
    return client.batches.cancel(batch_id)


def list_batches(client: OpenAI, limit: int) -> list[Batch]:
    """The `limit` most recent batches, newest first, over as many pages as it takes (a page holds at most 100)."""
    return list(islice(client.batches.list(limit=min(limit, 100)), limit))


def find_by_key(client: OpenAI, key: str, bound: int = SEARCH_BOUND) -> Batch | None:
    """The most recent of the last `bound` batches whose metadata carries idempotency key `key`, if any."""
    for batch in islice(client.batches.list(limit=100), bound):
        if (batch.metadata or {}).get(KEY_FIELD) == key:
            return batch
    return None


def download(client: OpenAI, file_id: str) -> bytes:
    """A file's content."""
    return client.files.content(file_id).content


def download_lines(client: OpenAI, file_id: str | None) -> list[str]:
    """The non-blank lines of a result file; none for a file the batch did not write."""
    if not file_id:
        return []
    text = client.files.content(file_id).content.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()]


def first_line(client: OpenAI, file_id: str | None) -> str | None:
    """The first non-blank line of a result file, read as a stream: the rest of a large file is not downloaded."""
    if not file_id:
        return None
    with client.files.with_streaming_response.content(file_id) as response:
        for line in response.iter_lines():
            if line.strip():
                return line
    return None


def transient(error: openai.OpenAIError) -> bool:
    """Whether a failed call may succeed if tried later: no connection or no answer in time, the server's
    own trouble (5xx) or its rate limit (429). A refusal of the request itself (4xx) will not pass."""
    if isinstance(error, openai.APIConnectionError):  # APITimeoutError is one too
        return True
    return isinstance(error, openai.APIStatusError) and (error.status_code >= 500 or error.status_code == 429)


def follow(
    client: OpenAI,
    batch_id: str,
    on_update: Callable[[Batch], Any],
    on_outage: Callable[[openai.OpenAIError | None], Any] = lambda error: None,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    first_interval: float = POLL_FIRST_SECONDS,
    max_interval: float = POLL_MAX_SECONDS,
    outage_limit: float = OUTAGE_LIMIT_SECONDS,
) -> Batch:
    """Poll a batch until it ends, calling `on_update` with each state seen; the final state.

    The interval grows by half each poll up to `max_interval`, so a short batch is seen finishing at
    once and a long one costs a request every few seconds.

    A poll that fails for a reason that may pass (`transient`) is tried again with a growing delay:
    the batch runs on the server whether or not this client can see it, so a restart or a network
    blip must not end the follow. `on_outage` is called with the error when polls start failing and
    with None when one succeeds again; after `outage_limit` seconds without a successful poll, the
    last error is raised.
    """
    interval = first_interval
    last_success = clock()
    delay: float | None = None  # while polls fail: the wait before the next one
    while True:
        try:
            batch = client.batches.retrieve(batch_id, timeout=POLL_TIMEOUT_SECONDS)
        except openai.OpenAIError as error:
            if not transient(error):
                raise
            left = last_success + outage_limit - clock()
            if left <= 0:
                raise
            if delay is None:
                on_outage(error)
                delay = OUTAGE_FIRST_DELAY
            sleep(min(delay, left))  # the last try falls at the limit, not past it
            delay = min(OUTAGE_MAX_DELAY, delay * 2)
            continue
        last_success = clock()
        if delay is not None:
            on_outage(None)
            delay = None
        on_update(batch)
        if batch.status in TERMINAL_STATUSES:
            return batch
        sleep(interval)
        interval = min(max_interval, interval * 1.5)
