"""A batch's life on the client: check the input and options before anything is sent, create the batch or
re-attach to the one made earlier under the same idempotency key, then follow it until it ends."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
from openai.types import Batch

from llama_batches import client as api
from llama_batches import jsonl
from llama_batches.output import note
from llama_batches.progress import BatchProgress, format_seconds

MAX_USER_METADATA = 14  # of the 16 metadata pairs a batch may carry, two hold the key and the fingerprint
RESERVED_PREFIX = "llama_batches_"


class Interrupted(Exception):
    """Ctrl-C, with what to tell the user about the batch left behind."""


# Preparing a batch: everything checked locally before anything is sent.


@dataclass(frozen=True)
class Plan:
    """A batch about to be created: the checked input and its parameters."""

    path: Path
    content: bytes
    custom_ids: list[str]
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    fingerprint: str  # the key derived from content and parameters
    key: str  # the idempotency key used: --key, or the fingerprint


def read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise api.CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise api.CliError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as error:
        raise api.CliError(f"cannot read {path}: {error.strerror or error}") from None


def parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise api.CliError(f"--metadata takes KEY=VALUE, not {pair!r}")
        if name.startswith(RESERVED_PREFIX):
            raise api.CliError(f"--metadata keys starting with {RESERVED_PREFIX} are reserved for this tool")
        metadata[name] = value
    if len(metadata) > MAX_USER_METADATA:
        raise api.CliError(f"at most {MAX_USER_METADATA} --metadata pairs (a batch carries 16, this tool uses 2)")
    return metadata


def plan_batch(
    input_path: str, endpoint: str | None, completion_window: str, metadata_pairs: Sequence[str], key: str | None
) -> Plan:
    """The batch of an input file on disk, with the command's options, checked."""
    path = Path(input_path)
    return plan_content(path, read_input(path), endpoint, completion_window, parse_metadata(metadata_pairs), key)


def plan_content(
    path: Path, content: bytes, endpoint: str | None, completion_window: str, metadata: dict[str, str], key: str | None
) -> Plan:
    """The batch of `content` (uploaded under `path`'s name), checked; nothing is sent."""
    problems = jsonl.check_input(content)
    if problems:
        raise api.CliError(f"{path}: {'; '.join(problems)} (nothing was uploaded)")
    lines = jsonl.parse_lines(content)
    try:
        lines_endpoint = jsonl.endpoint_of(lines)
    except jsonl.InputError as error:
        raise api.CliError(f"{path}: {error} (nothing was uploaded)") from None
    if endpoint is not None and endpoint != lines_endpoint:
        raise api.CliError(f"--endpoint is {endpoint} but the lines' url is {lines_endpoint}")
    fingerprint = jsonl.idempotency_key(content, lines_endpoint, completion_window, metadata)
    return Plan(
        path=path,
        content=content,
        custom_ids=[line["custom_id"] for line in lines],
        endpoint=lines_endpoint,
        completion_window=completion_window,
        metadata=metadata,
        fingerprint=fingerprint,
        key=key or fingerprint,
    )


# Starting and following it.


def start_batch(conn: api.Connection, plan: Plan) -> tuple[Batch, bool]:
    """The batch of this plan and whether it already existed: one created earlier under the same key
    (found in the metadata of recent batches, so a re-run uploads nothing), else a new upload and create."""
    with api.readable_errors(conn.base_url, plan.key):
        existing = api.find_by_key(conn.client, plan.key)
        if existing is not None:
            if (existing.metadata or {}).get(api.FINGERPRINT_FIELD) != plan.fingerprint:
                raise api.CliError(
                    f"the idempotency key '{plan.key}' was already used with other parameters (batch {existing.id}, "
                    "made from another file or options); pick another key with --key KEY"
                )
            return existing, True
        file_id = api.upload(conn.client, plan.path.name, plan.content)
        metadata = {**plan.metadata, api.KEY_FIELD: plan.key, api.FINGERPRINT_FIELD: plan.fingerprint}
        batch = api.create(conn.client, file_id, plan.endpoint, plan.completion_window, metadata, plan.key)
    requests = f"{len(plan.custom_ids)} request{'s' if len(plan.custom_ids) != 1 else ''}"
    note(f"Uploaded {plan.path.name} ({requests}) as {file_id}; created batch {batch.id}.")
    return batch, False


def announce(plan: Plan, batch: Batch, reattached: bool) -> None:
    if reattached:
        created = datetime.fromtimestamp(batch.created_at).isoformat(sep=" ", timespec="seconds")
        note(f"Re-attached to batch {batch.id} ({batch.status}, created {created}): nothing uploaded.")
        if batch.status in {"failed", "expired", "cancelled"}:
            note("To run this file again as a new batch, pass --key with a new key.")
    note(
        f"Idempotency key {plan.key}: running this same command again re-attaches to this batch "
        "instead of creating a new one."
    )


def sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else f"{text}."


def follow(conn: api.Connection, batch: Batch, again: str, **polling: Any) -> Batch:
    """Follow a batch with the progress display until it ends; Ctrl-C leaves it running, and so does an
    outage longer than `api.follow` rides out. `polling`: options of `api.follow` (tests pass a clock)."""
    if batch.status in api.TERMINAL_STATUSES:
        return batch
    limit = format_seconds(polling.get("outage_limit", api.OUTAGE_LIMIT_SECONDS))
    try:
        with BatchProgress() as progress:

            def outage(error: openai.OpenAIError | None) -> None:
                if error is None:
                    progress.say(f"{conn.base_url} answers again: following batch {batch.id}.")
                else:
                    progress.say(
                        f"{sentence(api.describe(error, conn.base_url))} Trying again for up to {limit} "
                        f"(batch {batch.id} runs on the server meanwhile)."
                    )

            return api.follow(conn.client, batch.id, progress.update, outage, **polling)
    except KeyboardInterrupt:
        raise Interrupted(f"batch {batch.id} keeps running on the server (not cancelled). {again}") from None
    except openai.OpenAIError as error:
        reason = api.describe(error, conn.base_url)
        if api.transient(error):  # `api.follow` gave up on it: the batch itself is most likely fine
            reason = f"{sentence(reason)} Gave up after {limit}; batch {batch.id} keeps running on the server. {again}"
        raise api.CliError(reason) from error
