"""What several unit test modules share about result lines: hypothesis strategies for hostile text
and JSON values, and the check that a result line is one valid line of JSON."""

import json
from typing import Any

from hypothesis import strategies as st

ODD_CHARACTERS = ['"', "\\", "\n", "\t", "\x00", "\x85", "\u2028", "\u2029", "\ud800", "\udfff", "\ud83d", "\ude00"]
any_text = st.text(st.characters(exclude_categories=()) | st.sampled_from(ODD_CHARACTERS))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)


def assert_result_line(line: str) -> dict[str, Any]:
    """A result line is one line of JSON that encodes to UTF-8 and reads back as valid Unicode; returns it parsed."""
    assert isinstance(line, str)
    assert len(line.splitlines()) == 1, "one line, even for readers splitting at U+2028"
    line.encode("utf-8")
    data = json.loads(line)
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # no lone surrogate escape either
    assert isinstance(data, dict) and set(data) == {"id", "custom_id", "response", "error"}
    return data
