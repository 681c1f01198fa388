"""What a backfill fills, its refusals, the go-live text, and the progress line."""

from __future__ import annotations

import io

import pytest

from dmp.backfill_job import BackfillError, activate, plan_job
from dmp.backfill_plan import segment_program
from dmp.progress import Progress
from dmp.rule_versions import RuleVersion
from segment_rules import CompiledRules, parse_rules

V1 = """segments:
  - id: viewers
    rule: {at_least: 2, within: 7d, where: {field: type, equals: page_view}}
"""
CLICKERS = """
  - id: clickers
    status: paused    # backfilling
    rule: {at_least: 1, within: 3d, where: {field: type, equals: click}}
  - id: both
    status: paused
    of: {and: [viewers, clickers]}
"""
V2 = V1 + CLICKERS
V3 = V2 + "  - id: later\n    rule: {at_least: 1, within: 1d, where: {field: type, equals: buy}}\n"


def versions(*texts: str) -> list[RuleVersion]:
    return [RuleVersion(n, str(n), f"v{n}", 0.0, t) for n, t in enumerate(texts, 1)]


def test_targets_are_the_traits_the_start_version_brought() -> None:
    job = plan_job(versions(V1, V2, V3), 3, "clickers")
    assert job.start_version == 2  # fed live since v2, through v3
    ruleset = parse_rules(V2)
    (click,) = segment_program(ruleset, ruleset.segment("clickers")).traits
    assert job.targets == (click.id,)
    assert job.name == "clickers@2"
    assert job.keep_for >= 3 * 86400
    assert job.notes == ()


def test_a_shared_trait_is_not_refilled_and_a_longer_need_is_reported() -> None:
    longer = V1 + (
        "  - id: keen\n    status: paused\n"
        "    rule: {at_least: 5, within: 30d, where: {field: type, equals: page_view}}\n"
    )
    job = plan_job(versions(V1, longer), 2, "keen")
    assert job.targets == ()
    (note,) = job.notes
    assert "shared with segments live before version 2" in note
    assert "kept 2 entries for 7d" in note


@pytest.mark.parametrize(
    ("live", "segment", "message"),
    [
        (None, "clickers", "no rule version has been applied"),
        (2, "ghost", "unknown segment 'ghost' in the live rule version 2; its segments are: "),
        (2, "viewers", "'viewers' is active in the live rule version 2"),
        (2, "both", "'both' is a composite of clickers, viewers"),
    ],
)
def test_refusals_say_why(live: int | None, segment: str, message: str) -> None:
    with pytest.raises(BackfillError) as refused:
        plan_job(versions(V1, V2), live, segment)
    assert message in str(refused.value)


def test_activate_flips_only_that_segment() -> None:
    ruleset = parse_rules(V2)
    text = activate(V2, ruleset, "clickers")
    assert "status: active    # backfilling" in text
    flipped = parse_rules(text)
    assert [s.status for s in flipped.segments] == ["active", "active", "paused"]
    # Same traits: the activated version feeds exactly what was backfilled.
    assert {t.id for t in CompiledRules(flipped).traits} == {
        t.id for t in CompiledRules(ruleset).traits
    }
    with pytest.raises(BackfillError, match="cannot find the one 'status: paused' line"):
        activate(V2, ruleset, "viewers")


def test_progress_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    now = [0.0]
    bar = Progress("events", 1000, out, every=5.0, clock=lambda: now[0])
    now[0] = 2.0
    bar.advance(400)  # first advance is shown
    now[0] = 4.0
    bar.advance(100)  # within 5s of the last line: not shown
    bar.finish()
    lines = out.getvalue().splitlines()
    assert lines == [
        "events 400/1,000 (40%) 200/s ETA 3s",
        "events 500/1,000 (50%) 125/s ETA 4s",
    ]


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress("events", 10, out, tty=True, clock=lambda: 1.0)
    bar.advance(5)
    assert out.getvalue().startswith("\r\x1b[K[###############...............] events 5/10")
