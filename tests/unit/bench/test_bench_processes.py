"""bench/processes.py sorts py-spy samples into categories, and counts the provider's own share."""

from pathlib import Path

from bench.processes import category_samples

LOOP = "run (/usr/lib/python3.12/asyncio/runners.py:44)"
OURS = "run_one (/x/llama_stack_provider_batches/engine/shard_run.py:170)"
STORAGE = "save (/x/llama_stack_provider_batches/storage/store.py:90)"
SQL = "execute (/x/site-packages/sqlalchemy/engine/base.py:1494)"
ROUTER = "openai_chat_completion (/x/site-packages/llama_stack/core/routers/inference.py:235)"
KVSTORE = "get (/x/site-packages/llama_stack/core/storage/kvstore/sqlite/sqlite.py:80)"


def test_own_counts_the_provider_and_the_sql_of_its_storage_only(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    rows = [
        (f"{LOOP};{OURS}", 3),  # the provider's code
        (f"{LOOP};{OURS};{STORAGE};{SQL}", 5),  # its database writes
        (f"{LOOP};{OURS};{ROUTER};{KVSTORE}", 7),  # the stack's registry, reached from a batch request
        (f"{LOOP};{OURS};{ROUTER}", 2),
    ]
    raw.write_text("".join(f"{stack} {count}\n" for stack, count in rows))
    counts = category_samples(raw)
    assert (counts["provider"], counts["sql"], counts["routing"]) == (3, 12, 2)
    assert counts["own"] == 3 + 5
