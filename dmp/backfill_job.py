"""What a backfill of one segment must fill, decided from the kept rule versions (pure).

Ingest has recorded the segment's traits live since the first version of the unbroken run
of versions (ending at the live one) that all feed them, keeping as much of them as the
live one: the *start version*. The traits
that version introduced are the backfill's *targets*; history before the start version's
live-from offsets is read from Kafka for them alone. Traits the segment shares with
segments that were already live were fed all along and are left as ingest kept them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dmp.backfill_merge import job_name
from dmp.backfill_plan import segment_program
from dmp.rule_versions import RuleVersion
from segment_rules import CompiledRules, RuleSet, parse_rules
from segment_rules.compiler import Trait
from segment_rules.graph import refs


class BackfillError(Exception):
    """The backfill cannot start or finish; the message says why and what to do."""


@dataclass(frozen=True)
class Job:
    segment: str
    start_version: int
    live: RuleVersion
    targets: tuple[str, ...]
    notes: tuple[str, ...]
    keep_for: float  # seconds of history the targets can use

    @property
    def name(self) -> str:
        return job_name(self.segment, self.start_version)


def _traits(version: RuleVersion) -> dict[str, Trait]:
    rules = CompiledRules(parse_rules(version.text, f"rules v{version.number}"))
    return {t.id: t for t in rules.traits}


def plan_job(versions: Sequence[RuleVersion], live_number: int | None, segment_id: str) -> Job:
    by_number = {v.number: v for v in versions}
    live = by_number.get(live_number) if live_number is not None else None
    if live is None:
        raise BackfillError(
            "no rule version has been applied: apply one with the segment set "
            f"'status: paused' first (dmp rules apply FILE), then backfill '{segment_id}'"
        )
    ruleset = parse_rules(live.text, f"rules v{live.number}")
    _check_segment(ruleset, live.number, segment_id)
    segment = ruleset.segment(segment_id)
    wanted = {t.id: t for t in segment_program(ruleset, segment).traits}
    live_traits = _traits(live)
    start = live.number
    before: dict[str, Trait] = {}
    while start - 1 in by_number:
        before = _traits(by_number[start - 1])
        if not _feeds(before, live_traits, wanted):
            break
        start -= 1
        before = {}
    targets = tuple(t for t in wanted if t not in before)
    notes = []
    for tid in wanted:
        old = before.get(tid)
        new = live_traits[tid]
        if old is not None and (old.keep < new.keep or old.keep_for < new.keep_for):
            notes.append(
                f"trait {tid} is shared with segments live before version {start}, which kept "
                f"{old.keep} entries for {old.keep_for / 86400:g}d: older history of it is "
                "not recovered"
            )
    keep_for = max((live_traits[t].keep_for for t in targets), default=0.0)
    return Job(segment_id, start, live, targets, tuple(notes), keep_for)


def _feeds(version: dict[str, Trait], live: dict[str, Trait], wanted: dict[str, Trait]) -> bool:
    """Whether ``version`` kept each wanted trait as the live version keeps it."""
    for tid in wanted:
        had = version.get(tid)
        if had is None or had.keep < live[tid].keep or had.keep_for < live[tid].keep_for:
            return False
    return True


def _check_segment(ruleset: RuleSet, number: int, segment_id: str) -> None:
    ids = [s.id for s in ruleset.segments]
    if segment_id not in ids:
        raise BackfillError(
            f"unknown segment '{segment_id}' in the live rule version {number}; "
            f"its segments are: {', '.join(ids)}"
        )
    segment = ruleset.segment(segment_id)
    if segment.of is not None:
        parts = sorted({r.segment_id for r in refs(segment.of)})
        raise BackfillError(
            f"'{segment_id}' is a composite of {', '.join(parts)}: it is bitmap algebra over "
            "them at lookup and has no history of its own; backfill its paused parts, "
            "then set it active"
        )
    if segment.status != "paused":
        raise BackfillError(
            f"'{segment_id}' is active in the live rule version {number}: a backfill fills a "
            f"paused segment; apply a version with '{segment_id}' set 'status: paused' first"
        )


_STATUS = re.compile(r"^(\s*)status:(\s*)paused\b")


def activate(text: str, ruleset: RuleSet, segment_id: str) -> str:
    """The rule text with only ``segment_id``'s ``status: paused`` made ``active``."""
    starts = sorted(s.loc.line for s in ruleset.segments)
    first = ruleset.segment(segment_id).loc.line
    later = [n for n in starts if n > first]
    lines = text.splitlines(keepends=True)
    end = later[0] - 1 if later else len(lines)
    found = [n for n in range(first - 1, end) if _STATUS.match(lines[n])]
    if len(found) != 1:
        raise BackfillError(
            f"cannot find the one 'status: paused' line of '{segment_id}' "
            f"(from line {first}): apply the version with it active yourself"
        )
    n = found[0]
    lines[n] = _STATUS.sub(r"\1status:\2active", lines[n], count=1)
    new_text = "".join(lines)
    flipped = parse_rules(new_text, "activated")
    for old, new in zip(ruleset.segments, flipped.segments, strict=True):
        expected = "active" if old.id == segment_id else old.status
        if new.id != old.id or new.status != expected:
            raise BackfillError(f"activating '{segment_id}' changed more than its status")
    return new_text
