"""The reference interpreter: the rule language's meaning, written plainly.

It reads every event a cookie ever had (no bounded history, no index) and evaluates each
rule from its definition. It is slow on purpose; property tests check that the compiled,
indexed evaluator (segment_rules.compiler) agrees with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from segment_rules.event_tests import url_parts
from segment_rules.graph import evaluate_composite, topological_order
from segment_rules.model import (
    Aggregate,
    All,
    Condition,
    CountWithin,
    FieldTest,
    FirstSeenWithin,
    Not,
    NotSeenWithin,
    Predicate,
    RuleSet,
    Score,
    Segment,
    SequenceRule,
)
from segment_rules.patterns import searcher

Event = Mapping[str, Any]
Timed = tuple[float, Event]


def field_values(event: Event, path: Sequence[str]) -> list[object]:
    node: object = event
    for key in path:
        if not isinstance(node, Mapping):
            return []
        node = node.get(key)
        if node is None:
            return []
    return list(node) if isinstance(node, list) else [node]


def number_at(event: Event, path: Sequence[str]) -> float | None:
    """The field's value when it is one number (not a list, not true/false)."""
    node: object = event
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _url(v: object) -> tuple[str, str] | None:
    return url_parts(v) if isinstance(v, str) else None


def field_passes(test: FieldTest, event: Event) -> bool:
    op, want, values = test.op, test.value, field_values(event, test.path)
    if op == "not_equals":
        return not any(v == want for v in values)
    if op == "not_in":
        assert isinstance(want, frozenset)
        return not any(isinstance(v, str | int | float | bool) and v in want for v in values)
    if op == "missing":
        return not values
    if op == "exists":
        return bool(values)
    for v in values:
        if op == "equals":
            ok = v == want
        elif op == "in":
            assert isinstance(want, frozenset)
            ok = isinstance(v, str | int | float | bool) and v in want
        elif op in ("gt", "gte", "lt", "lte", "between"):
            ok = _is_number(v) and _compare(op, float(v), want)  # type: ignore[arg-type]  # checked number
        elif op == "under_iab":
            ok = isinstance(v, str | int) and not isinstance(v, bool) and str(v) in test.expanded
        elif op in ("host", "host_suffix", "path_prefix"):
            url = _url(v)
            ok = url is not None and _url_test(op, str(want), *url)
        else:
            ok = isinstance(v, str) and _text_test(op, str(want), v)
        if ok:
            return True
    return False


def _compare(op: str, v: float, want: object) -> bool:
    if op == "between":
        assert isinstance(want, tuple)
        return bool(want[0] <= v <= want[1])
    assert isinstance(want, int | float)
    if op == "gt":
        return v > want
    if op == "gte":
        return v >= want
    if op == "lt":
        return v < want
    return v <= want


def _url_test(op: str, want: str, host: str, path: str) -> bool:
    if op == "host":
        return host == want
    if op == "host_suffix":
        return host == want or host.endswith("." + want)
    return path.startswith(want)


def _text_test(op: str, want: str, v: str) -> bool:
    if op == "prefix":
        return v.startswith(want)
    if op == "suffix":
        return v.endswith(want)
    if op == "contains":
        return want in v
    if op == "regex":
        return searcher(want)(v)
    assert op == "under"
    return v == want or v.startswith(want + "/")


def event_passes(pred: Predicate, event: Event) -> bool:
    if isinstance(pred, FieldTest):
        return field_passes(pred, event)
    if isinstance(pred, Not):
        return not event_passes(pred.part, event)
    if isinstance(pred, All):
        return all(event_passes(p, event) for p in pred.parts)
    return any(event_passes(p, event) for p in pred.parts)


class Interpreter:
    """Memberships from a cookie's complete event list.

    ``recorded_at`` is when the events reached the DMP: events already older than the
    retention then were never recorded, which matters to the rules with a memory
    (first seen, decaying scores).
    """

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset

    def members(self, events: Sequence[Timed], now: float, recorded_at: float) -> frozenset[str]:
        found = set()
        for seg in self.ruleset.base_segments:
            if seg.status != "active":
                continue
            assert seg.rule is not None
            if self.holds(seg.rule, events, now, recorded_at) and self._within_ttl(
                seg, events, now, recorded_at
            ):
                found.add(seg.id)
        return frozenset(found)

    def with_composites(self, base: frozenset[str]) -> list[str]:
        # Paused parts count as not held, as lookups count them.
        members = {
            s.id for s in self.ruleset.segments if s.of is None and s.status == "active"
        } & base
        for seg in topological_order(self.ruleset.segments):
            if (
                seg.of is not None
                and seg.status == "active"
                and evaluate_composite(seg.of, members)
            ):
                members.add(seg.id)
        return [s.id for s in self.ruleset.segments if s.id in members]

    def holds(self, cond: Condition, events: Sequence[Timed], now: float, rec: float) -> bool:
        if isinstance(cond, Not):
            return not self.holds(cond.part, events, now, rec)
        if isinstance(cond, All):
            return all(self.holds(p, events, now, rec) for p in cond.parts)
        if isinstance(cond, CountWithin):
            n = sum(1 for ts, e in events if ts > now - cond.within and event_passes(cond.where, e))
            return cond.at_least <= n and (cond.at_most is None or n <= cond.at_most)
        if isinstance(cond, NotSeenWithin):
            seen = [ts for ts, e in events if event_passes(cond.where, e)]
            return bool(seen) and now - cond.lookback < max(seen) <= now - cond.within
        if isinstance(cond, FirstSeenWithin):
            seen = [
                ts for ts, e in events if ts > rec - cond.memory and event_passes(cond.where, e)
            ]
            if not seen or max(seen) <= now - cond.memory:
                return False
            return min(seen) > now - cond.within
        if isinstance(cond, Aggregate):
            return _aggregate_holds(cond, events, now)
        if isinstance(cond, SequenceRule):
            return _sequence_holds(cond, events, now)
        if isinstance(cond, Score):
            return _score_holds(cond, events, now, rec)
        return any(self.holds(p, events, now, rec) for p in cond.parts)

    def _within_ttl(self, seg: Segment, events: Sequence[Timed], now: float, rec: float) -> bool:
        if seg.ttl is None:
            return True
        assert seg.rule is not None
        stamps = [ts for ts, e in events if _qualifies(seg.rule, e)]
        return bool(stamps) and max(stamps) + seg.ttl > now


def _qualifies(cond: Condition, event: Event) -> bool:
    """Is this a qualifying event for the TTL: does it feed any part of the rule."""
    if isinstance(cond, Not):
        return _qualifies(cond.part, event)
    if isinstance(cond, CountWithin | NotSeenWithin | FirstSeenWithin):
        return event_passes(cond.where, event)
    if isinstance(cond, Aggregate):
        return event_passes(cond.where, event) and number_at(event, cond.path) is not None
    if isinstance(cond, SequenceRule):
        return any(event_passes(s, event) for s in cond.steps)
    if isinstance(cond, Score):
        return any(event_passes(e.where, event) for e in cond.entries)
    return any(_qualifies(p, event) for p in cond.parts)


def _aggregate_holds(cond: Aggregate, events: Sequence[Timed], now: float) -> bool:
    values = [
        v
        for ts, e in events
        if ts > now - cond.within
        and event_passes(cond.where, e)
        and (v := number_at(e, cond.path)) is not None
    ]
    if cond.func == "sum":
        x = sum(values)
    elif values:
        x = sum(values) / len(values)
    else:
        return False
    return (cond.at_least is None or x >= cond.at_least) and (
        cond.at_most is None or x <= cond.at_most
    )


def _sequence_holds(cond: SequenceRule, events: Sequence[Timed], now: float) -> bool:
    stamps = [[ts for ts, e in events if event_passes(step, e)] for step in cond.steps]

    def chain(i: int, before: float, earliest: float) -> bool:
        if i < 0:
            return True
        return any(earliest <= s < before and chain(i - 1, s, earliest) for s in stamps[i])

    last = len(stamps) - 1
    return any(b > now - cond.within and chain(last - 1, b, b - cond.span) for b in stamps[last])


def _score_holds(cond: Score, events: Sequence[Timed], now: float, rec: float) -> bool:
    if cond.within is not None:
        total = sum(
            entry.points
            for ts, e in events
            if ts > now - cond.within
            for entry in cond.entries
            if event_passes(entry.where, e)
        )
        return total >= cond.at_least
    assert cond.half_life is not None
    hits = [
        (ts, entry.points)
        for ts, e in events
        if ts > rec - cond.memory
        for entry in cond.entries
        if event_passes(entry.where, e)
    ]
    if not hits or max(ts for ts, _ in hits) <= now - cond.memory:
        return False
    score = sum(p * math.exp2(-(now - ts) / cond.half_life) for ts, p in hits)
    return score >= cond.at_least


def decayed_score(cond: Score, events: Sequence[Timed], now: float, rec: float) -> float:
    """The decaying score itself (tests use it to skip comparisons right at the threshold)."""
    assert cond.half_life is not None
    return sum(
        entry.points * math.exp2(-(now - ts) / cond.half_life)
        for ts, e in events
        if ts > rec - cond.memory
        for entry in cond.entries
        if event_passes(entry.where, e)
    )
