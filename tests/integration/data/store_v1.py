"""The `store-v1` upgrade fixture: state written by the released code (commit 8ba69ed), see README.md."""

import json
import sqlite3
import tarfile
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


def unpack_store_v1(destination: Path) -> dict[str, Any]:
    """Extract the fixture into `destination` (`state/` and `manifest.json`), make its file paths
    point into `destination/state`, and return the manifest.

    The manifest gains `state_dir` (use it as STATE_DIR; `generated_state_dir` is where it was
    written) and `moved_file_paths`. A stack started on it needs the run.yaml of the generator, with
    authentication answering each `users[name]["token"]` with that user's principal and attributes,
    and the environment `stack_env`.
    """
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL, "r:gz") as archive:
        archive.extractall(destination, filter="data")
    manifest: dict[str, Any] = json.loads((destination / "manifest.json").read_text())
    state = (destination / "state").resolve()
    manifest["moved_file_paths"] = rewrite_file_paths(state / "sql.db", manifest["generated_state_dir"], str(state))
    manifest["state_dir"] = str(state)
    return manifest
