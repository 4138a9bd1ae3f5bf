"""The run configs shipped at the repository's root (run.yaml, run-ogx.yaml, run-replicas.yaml) read as
YAML without a key given twice: a YAML loader keeps the last of two equal keys without a word, so a
file pasted in twice (or a section repeated by an edit) would hide whatever the first copy said."""

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted(ROOT.glob("run*.yaml"))


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(
                    None, None, f"key {key!r} given twice, at lines {first_line[key]} and {line}", key_node.start_mark
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def strict_load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: no arbitrary objects


def test_the_shipped_run_configs_are_found() -> None:
    assert {path.name for path in RUN_CONFIGS} >= {"run.yaml", "run-ogx.yaml", "run-replicas.yaml"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda path: path.name)
def test_a_shipped_run_config_names_each_key_once(path: Path) -> None:
    config = strict_load(path.read_text())
    assert isinstance(config, dict) and config["version"] == 2
    assert "batches" in config["apis"]


def test_the_strict_loader_refuses_a_key_given_twice_at_any_depth() -> None:
    with pytest.raises(DuplicateKeyError, match="key 'version' given twice, at lines 1 and 3"):
        strict_load("version: 2\napis: [batches]\nversion: 2\n")
    with pytest.raises(DuplicateKeyError, match="key 'host' given twice"):
        strict_load("server:\n  host: a\n  port: 1\n  host: b\n")
    assert strict_load("a: {host: x}\nb: {host: y}\n") == {"a": {"host": "x"}, "b": {"host": "y"}}
