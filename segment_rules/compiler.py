"""RuleSet -> CompiledRules: event tests as closures, history kept per trait.

A *trait* is one distinct ``where:`` test. Every rule that uses the same test
shares its history, so a cookie's state grows with distinct tests, not rules.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from segment_rules.graph import evaluate_composite, topological_order
from segment_rules.model import (
    All,
    Condition,
    CountWithin,
    FieldTest,
    Not,
    Predicate,
    RuleSet,
    Segment,
)

Event = Mapping[str, Any]
EventTest = Callable[[Event], bool]
# trait id -> ascending event timestamps (seconds since the epoch)
History = dict[str, list[float]]


@dataclass(frozen=True)
class Trait:
    id: str
    test: EventTest
    keep: int
    keep_for: float


@dataclass(frozen=True)
class Evaluation:
    members: frozenset[str]
    next_change: float | None


def trait_id(pred: Predicate) -> str:
    """A stable id for a test, so stored history survives unrelated rule edits."""
    return hashlib.sha1(orjson.dumps(_canonical(pred)), usedforsecurity=False).hexdigest()[:12]


def _canonical(pred: Predicate) -> object:
    if isinstance(pred, FieldTest):
        value = pred.value
        if isinstance(value, frozenset):
            value = sorted(value, key=repr)  # type: ignore[assignment]  # list for JSON
        return [".".join(pred.path), pred.op, value]
    if isinstance(pred, Not):
        return ["not", _canonical(pred.part)]
    tag = "all" if isinstance(pred, All) else "any"
    return [tag, *(_canonical(p) for p in pred.parts)]


def _field_values(event: Event, path: tuple[str, ...]) -> list[object]:
    node: object = event
    for key in path:
        if not isinstance(node, Mapping):
            return []
        node = node.get(key)
        if node is None:
            return []
    return list(node) if isinstance(node, list) else [node]


def compile_predicate(pred: Predicate) -> EventTest:
    if isinstance(pred, FieldTest):
        path, op, want = pred.path, pred.op, pred.value
        if op == "equals":
            return lambda e: any(v == want for v in _field_values(e, path))
        if op == "in":
            assert isinstance(want, frozenset)
            return lambda e: any(_hashable(v) and v in want for v in _field_values(e, path))
        assert isinstance(want, str)
        return lambda e: any(
            isinstance(v, str) and v.startswith(want) for v in _field_values(e, path)
        )
    if isinstance(pred, Not):
        inner = compile_predicate(pred.part)
        return lambda e: not inner(e)
    parts = [compile_predicate(p) for p in pred.parts]
    if isinstance(pred, All):
        return lambda e: all(p(e) for p in parts)
    return lambda e: any(p(e) for p in parts)


def _hashable(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def _leaves(cond: Condition) -> Iterable[CountWithin]:
    if isinstance(cond, CountWithin):
        yield cond
    elif isinstance(cond, Not):
        yield from _leaves(cond.part)
    else:
        for part in cond.parts:
            yield from _leaves(part)


class CompiledRules:
    """What ingest and lookup run: event -> traits, history -> memberships."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.version = ruleset.version
        keep: dict[str, int] = {}
        keep_for: dict[str, float] = {}
        tests: dict[str, EventTest] = {}
        self._segment_traits: dict[str, tuple[str, ...]] = {}
        for seg in ruleset.base_segments:
            assert seg.rule is not None
            ids = []
            for leaf in _leaves(seg.rule):
                tid = trait_id(leaf.where)
                ids.append(tid)
                tests.setdefault(tid, compile_predicate(leaf.where))
                keep[tid] = max(keep.get(tid, 0), leaf.at_least)
                keep_for[tid] = max(keep_for.get(tid, 0.0), leaf.within)
            self._segment_traits[seg.id] = tuple(dict.fromkeys(ids))
        self.traits = tuple(Trait(t, tests[t], keep[t], keep_for[t]) for t in tests)
        self._active_base = tuple(s for s in ruleset.base_segments if s.status == "active")
        self._composites = tuple(
            s
            for s in topological_order(ruleset.segments)
            if s.of is not None and s.status == "active"
        )

    @property
    def base_segment_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.ruleset.base_segments)

    def matching_traits(self, event: Event) -> list[str]:
        return [t.id for t in self.traits if t.test(event)]

    def record(self, history: History, ts: float, trait_ids: Iterable[str], now: float) -> None:
        """Add one event's matches to the history and drop what no rule can still use."""
        by_id = {t.id: t for t in self.traits}
        for tid in trait_ids:
            trait = by_id[tid]
            if ts <= now - trait.keep_for:
                continue  # too late to count anywhere
            stamps = history.setdefault(tid, [])
            bisect.insort(stamps, ts)
            self._prune(stamps, trait, now)

    def prune(self, history: History, now: float) -> None:
        by_id = {t.id: t for t in self.traits}
        for tid in list(history):
            trait = by_id.get(tid)
            if trait is None:
                del history[tid]  # no rule uses this test any more
                continue
            self._prune(history[tid], trait, now)
            if not history[tid]:
                del history[tid]

    @staticmethod
    def _prune(stamps: list[float], trait: Trait, now: float) -> None:
        cut = bisect.bisect_right(stamps, now - trait.keep_for)
        drop = max(cut, len(stamps) - trait.keep)
        if drop > 0:
            del stamps[:drop]

    def evaluate(self, history: History, now: float) -> Evaluation:
        members: set[str] = set()
        changes: list[float] = []
        for seg in self._active_base:
            assert seg.rule is not None
            if self._holds(seg.rule, history, now, changes) and self._within_ttl(
                seg, history, now, changes
            ):
                members.add(seg.id)
        return Evaluation(frozenset(members), min(changes) if changes else None)

    def _holds(self, cond: Condition, history: History, now: float, changes: list[float]) -> bool:
        if isinstance(cond, CountWithin):
            stamps = history.get(trait_id(cond.where), [])
            start = bisect.bisect_right(stamps, now - cond.within)
            if start < len(stamps):
                # The count can only drop when the oldest stamp in the window leaves it.
                changes.append(stamps[start] + cond.within)
            return len(stamps) - start >= cond.at_least
        if isinstance(cond, Not):
            return not self._holds(cond.part, history, now, changes)
        results = [self._holds(p, history, now, changes) for p in cond.parts]
        return all(results) if isinstance(cond, All) else any(results)

    def _within_ttl(self, seg: Segment, history: History, now: float, changes: list[float]) -> bool:
        if seg.ttl is None:
            return True
        newest = max(
            (history[t][-1] for t in self._segment_traits[seg.id] if history.get(t)), default=None
        )
        if newest is None or newest + seg.ttl <= now:
            return False
        changes.append(newest + seg.ttl)
        return True

    def with_composites(self, base_members: Iterable[str]) -> list[str]:
        """Base memberships plus every active composite they satisfy, in file order."""
        members = set(base_members)
        for seg in self._composites:
            assert seg.of is not None
            if evaluate_composite(seg.of, members):
                members.add(seg.id)
        return [s.id for s in self.ruleset.segments if s.id in members]
