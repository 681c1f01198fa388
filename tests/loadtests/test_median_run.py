"""loadtests.ingest reports the freshness run with the median p99, and flags its verdict
when a run it rests on was disturbed."""

from __future__ import annotations

from loadtests.ingest import median_run, verdict_suspect


def test_the_middle_run_by_p99_with_its_position() -> None:
    runs = [{"p99_s": 0.9}, {"p99_s": 0.2}, {"p99_s": 0.5}]
    assert median_run(runs) == {"p99_s": 0.5, "median_run": 2}


def test_a_run_that_saw_no_probe_is_the_slowest() -> None:
    runs = [{"p99_s": float("nan")}, {"p99_s": 0.5}, {"p99_s": 0.3}]
    assert median_run(runs) == {"p99_s": 0.5, "median_run": 1}


def test_the_lower_middle_of_an_even_count() -> None:
    assert median_run([{"p99_s": 0.4}, {"p99_s": 0.1}])["median_run"] == 1


def busy(cores: float) -> dict[str, float]:
    return {"others_busy_cores": cores}


def test_only_the_runs_the_verdict_rests_on_make_it_suspect() -> None:
    quiet, loud = busy(0.3), busy(0.9)
    fresh = {"live_runs": [quiet], "runs": [quiet, loud, quiet], "median_run": 2}
    assert not verdict_suspect(fresh)  # a disturbed run that decides nothing
    assert verdict_suspect({**fresh, "median_run": 1})
    assert verdict_suspect({**fresh, "live_runs": [quiet, loud]})  # it set the rate
