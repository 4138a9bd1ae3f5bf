"""bench/compare.py's yardstick for latency-bound runs: a perfect sliding window over the same draws."""

from hypothesis import given
from hypothesis import strategies as st

from bench.compare import perfect_window

latencies = st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=200)


@given(latencies=latencies, window=st.integers(min_value=1, max_value=64))
def test_a_perfect_window_is_bounded_by_the_work_and_the_longest_request(latencies: list[float], window: int) -> None:
    makespan = perfect_window(latencies, window)
    assert makespan >= max(latencies) - 1e-9
    assert makespan >= sum(latencies) / window - 1e-9
    assert makespan <= sum(latencies) / window + max(latencies) + 1e-9  # greedy list scheduling's bound


@given(latencies=latencies)
def test_one_slot_runs_them_one_after_another_and_enough_slots_run_them_all_at_once(latencies: list[float]) -> None:
    assert abs(perfect_window(latencies, 1) - sum(latencies)) < 1e-6
    assert perfect_window(latencies, len(latencies)) == max(latencies)
