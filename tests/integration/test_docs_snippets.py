"""The documentation's examples run as written: every Python snippet of the README and of docs/ against a
real stack (the base URL swapped for the test stack's), in a directory holding the example input file
`requests.jsonl` (examples/requests.jsonl); each example line of the endpoints table passes
validation on the endpoint it names; the README's quick-start command writes every result."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.batching import read_result_file, upload_jsonl, wait_for_batch
from tests.processes import llama_batches
from tools.harness import REPO, ServerProcess

EXAMPLE_FILE = REPO / "examples" / "requests.jsonl"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCED = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SNIPPETS = [
    (page.relative_to(REPO), code)
    for page in PAGES
    for language, code in FENCED.findall(page.read_text())
    if language == "python"
]
ENDPOINTS_PAGE = (REPO / "docs" / "use" / "input.md").read_text()
# The example line of each endpoint, from the table of endpoints: | `endpoint` | runs through | `line` | model |
TABLE_LINES = re.findall(r"^\| `(/v1/[a-z/]+)` \| [^|]+ \| `(\{.*?\})` \|", ENDPOINTS_PAGE, re.MULTILINE)
# The README's first batch: `.venv/bin/llama-batches run examples/requests.jsonl -o results.jsonl`.
QUICK_START = re.search(r"^(?:\.venv/bin/)?llama-batches (run .*)$", (REPO / "README.md").read_text(), re.MULTILINE)


def snippet_id(snippet: tuple[Path, str]) -> str:
    page, code = snippet
    return f"{page}:{code.splitlines()[0][:40]}"


def test_the_docs_have_what_these_tests_read() -> None:
    assert len(SNIPPETS) >= 3
    assert [endpoint for endpoint, _ in TABLE_LINES] == [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
    ]
    assert QUICK_START is not None


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[snippet_id(snippet) for snippet in SNIPPETS])
def test_a_python_snippet_runs_as_written(stack: ServerProcess, tmp_path: Path, snippet: tuple[Path, str]) -> None:
    (tmp_path / "requests.jsonl").write_bytes(EXAMPLE_FILE.read_bytes())
    code = snippet[1].replace("http://127.0.0.1:8321", stack.url)
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


def test_the_readme_quick_start_writes_every_result_in_input_order(stack: ServerProcess, tmp_path: Path) -> None:
    assert QUICK_START is not None
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "requests.jsonl").write_bytes(EXAMPLE_FILE.read_bytes())
    done = llama_batches(f"{stack.url}/v1", *shlex.split(QUICK_START[1]), cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    output = shlex.split(QUICK_START[1])[-1]
    results = [json.loads(raw) for raw in (tmp_path / output).read_text().splitlines()]
    requests = [json.loads(raw) for raw in EXAMPLE_FILE.read_text().splitlines()]
    assert [result["custom_id"] for result in results] == [request["custom_id"] for request in requests]
    assert all(result["response"]["status_code"] == 200 for result in results)
