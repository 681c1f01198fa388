"""loadtests.ingest reports the freshness run with the median p99."""

from __future__ import annotations

from loadtests.ingest import median_run


def test_the_middle_run_by_p99_with_its_position() -> None:
    runs = [{"p99_s": 0.9}, {"p99_s": 0.2}, {"p99_s": 0.5}]
    assert median_run(runs) == {"p99_s": 0.5, "median_run": 2}


def test_a_run_that_saw_no_probe_is_the_slowest() -> None:
    runs = [{"p99_s": float("nan")}, {"p99_s": 0.5}, {"p99_s": 0.3}]
    assert median_run(runs) == {"p99_s": 0.5, "median_run": 1}


def test_the_lower_middle_of_an_even_count() -> None:
    assert median_run([{"p99_s": 0.4}, {"p99_s": 0.1}])["median_run"] == 1
