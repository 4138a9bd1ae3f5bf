"""The end of a batch: its last status, and the lines of the requests that never ran."""

import json
from typing import Any

import pytest

from llama_stack_provider_batches.domain.formats import expired_line
from llama_stack_provider_batches.engine.finalization import final_status, unrun_entries
from tests.unit.conftest import FakeFiles, FakeResponse, ProviderFactory
from tests.unit.helpers import chat_line, make_batch, read_lines, run_batch


@pytest.mark.parametrize("outcome", ["completed", "expired", "failed"])
def test_a_cancel_asked_for_wins_over_any_other_end(outcome: str) -> None:
    assert final_status(make_batch(status="cancelling"), outcome) == "cancelled"  # type: ignore[arg-type]
    assert final_status(make_batch(status="in_progress"), outcome) == outcome  # type: ignore[arg-type]


def test_unrun_requests_get_their_custom_id_where_it_is_known() -> None:
    entries = unrun_entries([0, 2, 5], ["a", "b", "c"], expired_line)
    assert [entry.position for entry in entries] == [0, 2, 5]
    assert not any(entry.ok for entry in entries)
    lines = [json.loads(entry.line_json) for entry in entries]
    assert [line["custom_id"] for line in lines] == ["a", "c", None]  # 5: stored by no earlier release
    assert {line["error"]["code"] for line in lines} == {"batch_expired"}


async def test_a_close_interrupted_after_an_upload_does_not_upload_a_second_file(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(job_retry_initial_seconds=0.01)
    store = provider._store
    real_update = store.update_record
    interrupted: list[str] = []

    async def die_after_the_upload(batch_id: str, change: Any, lease: Any = None) -> Any:
        probe = change(await store.get(batch_id))
        if probe.uploaded_files and not interrupted:  # the file is up, its id not recorded yet
            interrupted.append(batch_id)
            raise ConnectionError("the store went away")
        return await real_update(batch_id, change, lease)

    monkeypatch.setattr(store, "update_record", die_after_the_upload)
    batch = await run_batch(provider, files, [chat_line(f"r{i}") for i in range(5)])
    assert interrupted == [batch.id]
    assert batch.status == "completed"
    outputs = [file_id for file_id, name in files.names.items() if name == f"{batch.id}_output.jsonl"]
    assert outputs == [batch.output_file_id]
    assert len(read_lines(files, batch.output_file_id)) == 5
    await provider.shutdown()


async def test_a_file_found_after_an_interrupted_close_still_expires(
    make_provider: ProviderFactory, files: FakeFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await make_provider(job_retry_initial_seconds=0.01)
    store = provider._store
    real_upload, real_expire = files.openai_upload_file, store.retention.expire_file_at
    interrupted: list[str] = []

    async def upload(request: Any, file: Any) -> Any:  # with its creation time, as the stack's answers
        uploaded = await real_upload(request, file)
        return FakeResponse(id=uploaded.id, created_at=files.created[uploaded.id])

    async def die_before_the_expiry(file_id: str, *args: Any) -> None:
        if not interrupted:  # the file is up, its expiry not recorded yet
            interrupted.append(file_id)
            raise ConnectionError("the store went away")
        await real_expire(file_id, *args)

    monkeypatch.setattr(files, "openai_upload_file", upload)
    monkeypatch.setattr(store.retention, "expire_file_at", die_before_the_expiry)
    expiry = {"anchor": "created_at", "seconds": 3600}
    batch = await run_batch(provider, files, [chat_line("r0")], output_expires_after=expiry)
    assert batch.status == "completed" and interrupted == [batch.output_file_id]  # found, not uploaded again
    [due] = await store.retention.files_due(files.created[batch.output_file_id] + 3600, 10)
    assert due.file_id == batch.output_file_id
    await provider.shutdown()
