"""The package's layout: subpackages by role, each saying what it may use, no import upwards, no cycle.

The layers themselves are the import-linter contract in pyproject.toml; this runs it, and adds what a
layers contract does not see: cycles between modules of one subpackage."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import llama_stack_provider_batches

PACKAGE = "llama_stack_provider_batches"
ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = [info.name for info in pkgutil.iter_modules(llama_stack_provider_batches.__path__) if info.ispkg]


def test_the_package_is_split_by_role() -> None:
    assert sorted(SUBPACKAGES) == ["api", "domain", "engine", "requests", "storage"]


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_says_what_lives_there_and_what_it_may_use(subpackage: str) -> None:
    module = importlib.import_module(f"{PACKAGE}.{subpackage}")
    doc = module.__doc__ or ""
    assert "May use:" in doc
    listed = {line.split()[0] for line in doc.splitlines() if line.startswith("    ") and line.strip()}
    present = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert listed == present, "the docstring lists every module of the subpackage, and only those"


def test_no_module_imports_a_layer_above_it() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append((importer, *back))
    assert cycles == []
