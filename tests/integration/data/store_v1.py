"""The `store-v1` upgrade fixture: state written by the released code (commit 8ba69ed), see README.md."""

import json
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import Any

TARBALL = Path(__file__).resolve().with_name("store-v1.tar.gz")


def rewrite_file_paths(sql_db: Path, old_state_dir: str, new_state_dir: str) -> int:
    """Point the files provider's absolute paths (column `file_path`, in whichever table has one:
    `openai_files` under llama-stack 0.7) from `old_state_dir` to `new_state_dir`; how many moved."""
    old_prefix = old_state_dir.rstrip("/") + "/"
    new_prefix = new_state_dir.rstrip("/") + "/"
    moved = 0
    connection = sqlite3.connect(sql_db)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            if "file_path" not in columns:
                continue
            rows = connection.execute(f'SELECT rowid, file_path FROM "{table}"').fetchall()
            for rowid, path in rows:
                if isinstance(path, str) and path.startswith(old_prefix):
                    new_path = new_prefix + path[len(old_prefix) :]
                    connection.execute(f'UPDATE "{table}" SET file_path = ? WHERE rowid = ?', (new_path, rowid))
                    moved += 1
        connection.commit()
    finally:
        connection.close()
    return moved


# The epoch-second columns of the stack's own tables in `sql.db`, by table.
SQL_TIME_COLUMNS = {
    "openai_files": ("created_at", "expires_at"),
    "inference_store": ("created",),
    "openai_conversations": ("created_at",),
    "conversation_items": ("created_at",),
}


def shift_times(value: Any, seconds: int) -> Any:
    """`value` with every integer under a key ending in `_at` moved by `seconds` (at any depth)."""
    if isinstance(value, dict):
        return {
            key: item + seconds
            if key.endswith("_at") and isinstance(item, int) and not isinstance(item, bool)
            else shift_times(item, seconds)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [shift_times(item, seconds) for item in value]
    return value


def written_at(kv_db: Path) -> int:
    """When the fixture was written: the newest `created_at` of its batch records."""
    connection = sqlite3.connect(kv_db)
    try:
        rows = connection.execute("SELECT value FROM kvstore WHERE key LIKE '%/batch/batch_%'").fetchall()
    finally:
        connection.close()
    return max(json.loads(value)["batch"]["created_at"] for (value,) in rows)


def move_to_now(state: Path, manifest: dict[str, Any]) -> int:
    """Move every absolute time the fixture holds (batch records, the files' and the stack's tables,
    the manifest) so that it reads as written just now; the number of seconds moved.

    The released code wrote absolute times (`expires_at` 24 h after creation): unmoved, the batch
    killed mid-run would have expired for good a day after the fixture was made."""
    seconds = int(time.time()) - written_at(state / "kv.db")
    connection = sqlite3.connect(state / "kv.db")
    try:
        rows = connection.execute("SELECT key, value FROM kvstore WHERE key LIKE '%/batch/batch_%'").fetchall()
        for key, value in rows:
            moved = json.dumps(shift_times(json.loads(value), seconds))
            connection.execute("UPDATE kvstore SET value = ? WHERE key = ?", (moved, key))
        connection.commit()
    finally:
        connection.close()
    connection = sqlite3.connect(state / "sql.db")
    try:
        for table, columns in SQL_TIME_COLUMNS.items():
            for column in columns:
                connection.execute(
                    f'UPDATE "{table}" SET "{column}" = "{column}" + ? WHERE "{column}" IS NOT NULL', (seconds,)
                )
        connection.commit()
    finally:
        connection.close()
    manifest.update(shift_times({key: manifest[key] for key in ("users", "unfinished")}, seconds))
    return seconds


def unpack_store_v1(destination: Path) -> dict[str, Any]:
    """Extract the fixture into `destination` (`state/` and `manifest.json`), make its file paths
    point into `destination/state`, and return the manifest.

    Every absolute time in it is moved to now (`move_to_now`), so that a test reads the same on any
    date. The manifest gains `state_dir` (use it as STATE_DIR; `generated_state_dir` is where it was
    written), `moved_file_paths` and `moved_seconds`. A stack started on it needs the run.yaml of the generator, with
    authentication answering each `users[name]["token"]` with that user's principal and attributes,
    and the environment `stack_env`.
    """
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL, "r:gz") as archive:
        archive.extractall(destination, filter="data")
    manifest: dict[str, Any] = json.loads((destination / "manifest.json").read_text())
    state = (destination / "state").resolve()
    manifest["moved_file_paths"] = rewrite_file_paths(state / "sql.db", manifest["generated_state_dir"], str(state))
    manifest["moved_seconds"] = move_to_now(state, manifest)
    manifest["state_dir"] = str(state)
    return manifest
