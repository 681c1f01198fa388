"""Which segments a rule version would make live, and how an unfinished backfill is told."""

from __future__ import annotations

from dmp.backfill_abandon import Removed
from dmp.backfill_status import Unfinished, going_live


def test_going_live_is_active_now_and_not_before() -> None:
    before = [("a", "active"), ("b", "paused"), ("c", "paused")]
    after = [("a", "active"), ("b", "active"), ("c", "paused"), ("d", "active")]
    assert going_live(before, after) == {"b", "d"}
    assert going_live(after, before) == set()


def test_an_unfinished_backfill_says_where_it_stands() -> None:
    job = Unfinished("clickers@2", [0, 1, 2, 3], merged={0}, staged={1, 2})
    assert job.segment == "clickers"
    assert job.describe() == (
        "backfill clickers@2 is merged on partitions [0] of [0, 1, 2, 3], "
        "still merging on [1, 2], not staged on [3]"
    )
    refused = Unfinished("b@7", [0], staged={0}, errors=["partition 0: no traits"])
    assert refused.segment == "b"
    assert refused.describe().endswith("still merging on [0], refused: partition 0: no traits")


def test_the_rerun_names_the_period_the_job_was_started_with() -> None:
    assert Unfinished("clickers@2", [0, 1], days={8.0}).rerun == (
        "dmp rules backfill clickers --days 8"
    )
    # Unknown (a stage from before manifests kept it) or, impossibly, two: a placeholder.
    assert Unfinished("clickers@2", [0, 1]).rerun.endswith("--days D")
    assert Unfinished("clickers@2", [0, 1], days={8.0, 30.0}).rerun.endswith("--days D")


def test_what_abandoning_removed_from_a_partition_is_told() -> None:
    nothing = Removed(3)
    assert nothing.empty
    assert not nothing.had_merged
    partly = Removed(1, stages=["c@2 (2 of 5 chunks merged)"], chunks=3, chunks_merged=2)
    assert partly.had_merged  # two chunks' history is in the cookie states
    assert (
        partly.describe()
        == "partition 1: removed stage c@2 (2 of 5 chunks merged); 3 unmerged chunks"
    )
    done = Removed(0, merged=["c@2"], marks=["trait:t@2"])
    assert done.had_merged
    assert done.describe() == "partition 0: removed merged marker c@2; trait marks trait:t@2"
