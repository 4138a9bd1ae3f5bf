"""The README's examples run as written: its Python snippets against a real stack (the base URL swapped
for the test stack's), in a directory holding its example `requests.jsonl`; its example lines pass
validation on the endpoints they name."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.batching import read_result_file, upload_jsonl, wait_for_batch
from tools.harness import REPO, ServerProcess

README = (REPO / "README.md").read_text()
FENCED = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
PYTHON_SNIPPETS = [code for language, code in FENCED.findall(README) if language == "python"]
EXAMPLE_FILE = next(code for language, code in FENCED.findall(README) if language == "json" and '"custom_id"' in code)
# The example line of each endpoint, from the README's table of endpoints.
TABLE_LINES = re.findall(r"^\| `(/v1/[a-z/]+)` \| [^|]+ \| `(\{.*?\})` \|", README, re.MULTILINE)


def test_the_readme_has_what_these_tests_read() -> None:
    assert PYTHON_SNIPPETS
    assert [endpoint for endpoint, _ in TABLE_LINES] == [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
    ]


@pytest.mark.parametrize("snippet", PYTHON_SNIPPETS, ids=lambda code: code.splitlines()[0][:40])
def test_a_python_snippet_runs_as_written(stack: ServerProcess, tmp_path: Path, snippet: str) -> None:
    (tmp_path / "requests.jsonl").write_text(EXAMPLE_FILE)
    code = snippet.replace("http://127.0.0.1:8321", stack.url)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("endpoint", "line"), TABLE_LINES, ids=[endpoint for endpoint, _ in TABLE_LINES])
def test_each_example_line_of_the_endpoints_table_runs(openai_client: OpenAI, endpoint: str, line: str) -> None:
    file_id = upload_jsonl(openai_client, line.encode())
    created = openai_client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    batch = wait_for_batch(openai_client, created.id)
    assert (batch.status, batch.request_counts.completed) == ("completed", 1), batch.errors
    result = read_result_file(openai_client, batch.output_file_id)[0]
    assert result["custom_id"] == json.loads(line)["custom_id"]
