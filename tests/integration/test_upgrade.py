"""An upgrade from the previous release: a real stack of this code started on the state the previous
release wrote (tests/integration/data: two users, finished batches, idempotency keys, and a batch
killed mid-run) finds every batch, lists each user's in the same order, keeps keys and owners, and
resumes the killed batch from its stored results."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.integration.batching import read_result_file, wait_for_batch
from tests.integration.data.store_v1 import unpack_store_v1
from tools.harness import ServerProcess, StandInControl, run_yaml_with_auth, start_stack, token_endpoint, warm_up


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return unpack_store_v1(tmp_path_factory.mktemp("store-v1"))


@pytest.fixture(scope="module")
def upgraded(
    manifest: dict[str, Any], run_dir: Path, standin_server: ServerProcess
) -> Iterator[tuple[ServerProcess, dict[str, Any]]]:
    users = {
        user["token"]: {"principal": user["principal"], "attributes": user["attributes"]}
        for user in manifest["users"].values()
    }
    with token_endpoint(users) as endpoint:
        directory = run_dir / "upgrade"
        directory.mkdir()
        run_yaml = run_yaml_with_auth(directory, endpoint)
        state = Path(manifest["state_dir"])
        stack = start_stack(run_dir, state, f"{standin_server.url}/v1", manifest["stack_env"], run_yaml=run_yaml)
        warm_up(stack, headers={"Authorization": f"Bearer {manifest['users']['alice']['token']}"})
        yield stack, manifest
        stack.stop()


def client_of(stack: ServerProcess, manifest: dict[str, Any], user: str) -> OpenAI:
    token = manifest["users"][user]["token"]
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=60)


def listed(client: OpenAI) -> list[str]:
    ids: list[str] = []
    after = None
    while True:
        page = client.batches.list(limit=2, after=after) if after else client.batches.list(limit=2)
        ids.extend(batch.id for batch in page.data)
        if not page.has_more:
            return ids
        after = page.data[-1].id


def test_every_batch_is_found_by_its_owner_only_and_listed_in_order(
    upgraded: tuple[ServerProcess, dict[str, Any]],
) -> None:
    stack, manifest = upgraded
    for name, user in manifest["users"].items():
        client = client_of(stack, manifest, name)
        assert listed(client) == user["batch_ids"]
        for expected in user["batches"]:
            batch = client.batches.retrieve(expected["id"])
            if expected["status"] == "in_progress":
                continue  # it runs on: the next test follows it
            assert (batch.status, batch.output_file_id, batch.error_file_id) == (
                expected["status"],
                expected["output_file_id"],
                expected["error_file_id"],
            )
            assert batch.request_counts.model_dump() == expected["request_counts"]
        other = next(other for other in manifest["users"] if other != name)
        with pytest.raises(openai.NotFoundError):
            client_of(stack, manifest, other).batches.retrieve(user["batch_ids"][0])


def test_idempotency_keys_still_name_their_batches_per_user(upgraded: tuple[ServerProcess, dict[str, Any]]) -> None:
    stack, manifest = upgraded
    for name, user in manifest["users"].items():
        client = client_of(stack, manifest, name)
        for expected in user["batches"]:
            if expected["idempotency_key"] is None:
                continue
            again = client.batches.create(
                input_file_id=expected["input_file_id"],
                endpoint=expected["endpoint"],
                completion_window="24h",
                metadata=expected["metadata"],
                extra_body={"idempotency_key": expected["idempotency_key"]},
            )
            assert again.id == expected["id"]
            with pytest.raises(openai.ConflictError):
                client.batches.create(
                    input_file_id=expected["input_file_id"],
                    endpoint=expected["endpoint"],
                    completion_window="24h",
                    metadata={"other": "parameters"},
                    extra_body={"idempotency_key": expected["idempotency_key"]},
                )
        assert listed(client) == user["batch_ids"]  # nothing new was created


def test_the_batch_killed_mid_run_resumes_from_its_stored_results(
    upgraded: tuple[ServerProcess, dict[str, Any]], standin: StandInControl
) -> None:
    stack, manifest = upgraded
    client = client_of(stack, manifest, "alice")
    [running] = [batch for batch in manifest["users"]["alice"]["batches"] if batch["status"] == "in_progress"]
    done = wait_for_batch(client, running["id"], timeout=120)
    assert done.status == "completed"
    total = running["request_counts"]["total"]
    assert done.request_counts.completed == total
    lines = read_result_file(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(manifest["unfinished"]["custom_ids"])
    input_lines = [json.loads(raw) for raw in client.files.content(running["input_file_id"]).text.splitlines() if raw]
    prompts = [line["body"]["messages"][0]["content"] for line in input_lines]
    received = standin.stats()["by_prompt"]
    asked = sum(received.get(prompt, 0) for prompt in prompts)
    assert asked == total - running["request_counts"]["completed"]  # the stored results were not asked again
