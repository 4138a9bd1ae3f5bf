"""The documentation: the site under docs/ builds with `mkdocs build --strict` (a broken link or anchor,
or a page left out of the nav, fails it), its configuration reference names every setting, and the
README's links lead to pages and headings that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_stack_provider_batches.config import BatchesProviderConfig

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).parent / "mkdocs"
README = (ROOT / "README.md").read_text()
# Relative links of the README: [text](path#anchor), leaving out web addresses.
README_LINKS = [
    (path, anchor)
    for path, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", README)
    if not re.match(r"[a-z]+://", path)
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [str(MKDOCS), "build", "--strict", "--site-dir", str(site_dir)]
    built = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return site_dir


def test_the_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").exists()
    assert (site / "images" / "compare.png").exists()


def test_the_configuration_reference_is_generated_with_every_setting(site: Path) -> None:
    page = (site / "operate" / "configuration" / "index.html").read_text()
    assert "config-reference" not in page  # the marker was replaced
    for name, field in BatchesProviderConfig.model_fields.items():
        assert f"<code>{name}</code>" in page, name
        assert field.description
    assert "<code>BATCHES_LEASE_SECONDS</code>" in page  # the run.yaml column


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and MkDocs, for headings of words, spaces and hyphens) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(markdown: str) -> set[str]:
    outside_code = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {github_anchor(title) for title in re.findall(r"^#+ (.+)$", outside_code, re.MULTILINE)}


def test_the_readme_has_links_to_check() -> None:
    assert len(README_LINKS) > 20


@pytest.mark.parametrize(("path", "anchor"), README_LINKS, ids=[f"{p}#{a}" if a else p for p, a in README_LINKS])
def test_each_readme_link_leads_somewhere(path: str, anchor: str) -> None:
    target = ROOT / path
    assert target.exists(), path
    if anchor:
        assert anchor in headings(target.read_text()), f"{path} has no heading for #{anchor}"


@pytest.mark.parametrize(
    "link",
    [
        "docs/operate/running.md#ports",
        "docs/operate/running.md#state-directory",
        "docs/use/input.md#model-names",
        "docs/operate/deployment.md#replicas",
        "docs/operate/configuration.md#settings",
    ],
)
def test_the_readme_links_straight_to_the_common_settings(link: str) -> None:
    assert f"]({link})" in README
