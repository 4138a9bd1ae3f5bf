"""bench/chaos.py: its input lines and the table it prints of both providers' outcomes."""

import json

import pytest

from bench.chaos import Outcome, batch_lines, print_table


def test_each_request_has_its_own_prompt_to_count_repeats_by() -> None:
    content, prompts = batch_lines(5, "t1")
    lines = [json.loads(line) for line in content.decode().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"r{n}" for n in range(5)]
    assert [line["body"]["messages"][0]["content"] for line in lines] == prompts
    assert len(set(prompts)) == 5


def test_the_table_puts_the_providers_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    ours = Outcome("ours", "db-2s", "completed", 800, 800, True, 0, 8, ["1.8", "1.5"], True)
    builtin = Outcome("builtin", "db-2s", "failed", 800, 0, False, 0, 0, ["-"], False, ["no progress"])
    print_table([ours, builtin])
    table = capsys.readouterr().out
    assert "db-2s" in table and "ours" in table and "builtin" in table
    going_on = next(line for line in table.splitlines() if "going on after" in line)
    assert "1.8, 1.5" in going_on and going_on.rstrip().endswith("-")
    assert "note (builtin): no progress" in table
