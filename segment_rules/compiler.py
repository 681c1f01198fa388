"""RuleSet -> CompiledRules: an event index, bounded per-cookie state, exact evaluation.

A *test* is one distinct ``where:`` predicate; ``matching_traits`` returns the ids of the
tests an event passes (through segment_rules.event_index). A *trait* is one piece of
per-cookie state fed by tests: event times (counts, recency, sequences, windowed scores),
[time, value] pairs (sums, averages), [first, last] (first seen), [time, score] (decaying
scores) or [completion time] (sequences). Rules that use the same test share its times, so a
cookie's state grows with distinct tests, not rules. A times trait's id is its test's id,
as in rules v1, so stored history survives the upgrade.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from segment_rules.canonical import predicate_form, short_hash, trait_id
from segment_rules.event_index import EventIndex
from segment_rules.event_tests import Event, compile_predicate
from segment_rules.graph import evaluate_composite, topological_order
from segment_rules.interpreter import number_at
from segment_rules.model import (
    Aggregate,
    All,
    Condition,
    CountWithin,
    FirstSeenWithin,
    Leaf,
    Not,
    NotSeenWithin,
    Predicate,
    RuleSet,
    Score,
    Segment,
    SequenceRule,
)

try:
    from segment_rules._kernel import Kernel
except ImportError:  # not built (pip install -e . builds it): the Python below does the work
    Kernel = None  # type: ignore[assignment,misc]  # a class when built, else None

# trait id -> its state (see the module docstring); JSON-serialisable, stored per cookie.
History = dict[str, list[Any]]
# Whether a condition holds for a history at a time; appends the times it may change at.
_Holds = Callable[[History, float, list[float]], bool]

TIMES, VALUES, FIRST, DECAY, DONE = "times", "values", "first", "decay", "done"
MAX_VALUES = 256  # [time, value] pairs kept per sum/average trait: a cookie past it is a bot
SEQUENCE_KEEP = 32  # event times kept per sequence step
# The kernel's codes (segment_rules/_kernel.c): trait kinds, and its nodes' operations.
_KIND_CODES = {TIMES: 0, VALUES: 1, FIRST: 2, DECAY: 3, DONE: 4}
_ALL, _ANY, _NOT, _COUNT, _PY, _TTL, _LAPSED, _FIRST, _DONE, _DECAYED, _WINDOWED = range(11)

__all__ = [
    "CompiledRules",
    "Evaluation",
    "History",
    "Kernel",
    "Trait",
    "compile_predicate",
    "trait_id",
]


@dataclass
class Trait:
    id: str
    kind: str
    keep: int  # entries kept (times and values kinds)
    keep_for: float  # seconds an entry is kept after its event time


@dataclass(frozen=True)
class Evaluation:
    members: frozenset[str]
    next_change: float | None


@dataclass(frozen=True)
class _Update:
    """What one matching test does to one trait."""

    trait: Trait
    points: float = 0.0
    path: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()  # a sequence's step tests (their times traits)
    span: float = 0.0
    half_life: float = 0.0


_LEAF_TYPES = (CountWithin, NotSeenWithin, FirstSeenWithin, Aggregate, SequenceRule, Score)


def _leaves(cond: Condition) -> Iterator[Leaf]:
    if isinstance(cond, Not):
        yield from _leaves(cond.part)
    elif isinstance(cond, All) or not isinstance(
        cond, CountWithin | NotSeenWithin | FirstSeenWithin | Aggregate | SequenceRule | Score
    ):
        for part in cond.parts:
            yield from _leaves(part)
    else:
        yield cond


def _state_id(kind: str, *form: object) -> str:
    return short_hash([kind, *form])


class CompiledRules:
    """What ingest and lookup run: event -> tests, history -> memberships."""

    # The ids of the tests an event passes, each once (segment_rules.event_index): the
    # generated function itself, since a method around it was a tenth of its cost.
    matching_traits: Callable[[Event], tuple[str, ...]]

    def __init__(self, ruleset: RuleSet, *, native: bool = True) -> None:
        """``native=False`` keeps record, prune and evaluate in Python (the reference the
        C kernel is tested against); by default the kernel runs them when it is built."""
        self.ruleset = ruleset
        self.version = ruleset.version
        self._traits: dict[str, Trait] = {}
        self._tests: dict[str, Predicate] = {}
        self._updates: dict[str, list[_Update]] = {}
        self._leaf_ids: dict[int, tuple[str, ...]] = {}  # id(leaf) -> its traits
        self._segment_traits: dict[str, tuple[str, ...]] = {}
        for seg in ruleset.base_segments:
            assert seg.rule is not None
            ids: list[str] = []
            for leaf in _leaves(seg.rule):
                leaf_ids = self._compile_leaf(leaf)
                self._leaf_ids[id(leaf)] = leaf_ids
                ids.extend(leaf_ids)
            self._segment_traits[seg.id] = tuple(dict.fromkeys(ids))
        for seg in ruleset.base_segments:
            if seg.ttl is not None:
                for tid in self._segment_traits[seg.id]:
                    trait = self._traits[tid]
                    if trait.kind in (TIMES, VALUES, DONE):  # the others' memory is semantic
                        trait.keep_for = max(trait.keep_for, seg.ttl)
        self.traits = tuple(self._traits.values())
        self._index = EventIndex(self._tests)
        self.matching_traits = self._index.match
        self._active_base = tuple(s for s in ruleset.base_segments if s.status == "active")
        self._active_base_ids = frozenset(s.id for s in self._active_base)
        checks: list[tuple[str, _Holds, _Holds | None]] = []
        for seg in self._active_base:
            assert seg.rule is not None
            checks.append((seg.id, self._check(seg.rule), self._ttl_check(seg)))
        self._checks = tuple(checks)
        self._by_trait: dict[str, list[int]] = {}
        for n, seg in enumerate(self._active_base):
            for tid in self._segment_traits[seg.id]:
                self._by_trait.setdefault(tid, []).append(n)
        self._composites = tuple(
            s
            for s in topological_order(ruleset.segments)
            if s.of is not None and s.status == "active"
        )
        self._kernel = self._build_kernel() if native and Kernel is not None else None

    # -- building -----------------------------------------------------------------------------
    def _trait(self, tid: str, kind: str, keep: int, keep_for: float) -> Trait:
        trait = self._traits.get(tid)
        if trait is None:
            trait = self._traits[tid] = Trait(tid, kind, keep, keep_for)
        else:
            trait.keep = max(trait.keep, keep)
            trait.keep_for = max(trait.keep_for, keep_for)
        return trait

    def _test(self, pred: Predicate) -> str:
        tid = trait_id(pred)
        self._tests.setdefault(tid, pred)
        return tid

    def _on(self, test: str, update: _Update) -> None:
        updates = self._updates.setdefault(test, [])
        if update not in updates:
            updates.append(update)

    def _times(self, pred: Predicate, keep: int, keep_for: float) -> str:
        test = self._test(pred)
        self._on(test, _Update(self._trait(test, TIMES, keep, keep_for)))
        return test

    def _compile_leaf(self, leaf: Leaf) -> tuple[str, ...]:
        if isinstance(leaf, CountWithin):
            keep = leaf.at_least if leaf.at_most is None else leaf.at_most + 1
            return (self._times(leaf.where, max(keep, 1), leaf.within),)
        if isinstance(leaf, NotSeenWithin):
            return (self._times(leaf.where, 1, leaf.lookback),)
        if isinstance(leaf, FirstSeenWithin):
            tid = _state_id(FIRST, leaf.memory, predicate_form(leaf.where))
            self._on(self._test(leaf.where), _Update(self._trait(tid, FIRST, 2, leaf.memory)))
            return (tid,)
        if isinstance(leaf, Aggregate):
            tid = _state_id(VALUES, ".".join(leaf.path), predicate_form(leaf.where))
            trait = self._trait(tid, VALUES, MAX_VALUES, leaf.within)
            self._on(self._test(leaf.where), _Update(trait, path=leaf.path))
            return (tid,)
        if isinstance(leaf, SequenceRule):
            steps = tuple(
                self._times(s, SEQUENCE_KEEP, leaf.within + leaf.span) for s in leaf.steps
            )
            tid = _state_id(DONE, leaf.span, [predicate_form(s) for s in leaf.steps])
            update = _Update(self._trait(tid, DONE, 1, leaf.within), steps=steps, span=leaf.span)
            for step in steps:
                self._on(step, update)
            return (*steps, tid)
        if leaf.within is not None:
            return tuple(
                self._times(e.where, math.ceil(leaf.at_least / e.points), leaf.within)
                for e in leaf.entries
            )
        assert leaf.half_life is not None
        forms = sorted(([e.points, predicate_form(e.where)] for e in leaf.entries), key=repr)
        tid = _state_id(DECAY, leaf.half_life, leaf.memory, forms)
        if tid in self._traits:
            return (tid,)  # the same score in another rule: its updates are in already
        trait = self._trait(tid, DECAY, 2, leaf.memory)
        for entry in leaf.entries:
            update = _Update(trait, points=entry.points, half_life=leaf.half_life)
            self._updates.setdefault(self._test(entry.where), []).append(update)
        return (tid,)

    def _build_kernel(self) -> Kernel:
        """The same rules for segment_rules/_kernel.c: traits by index, each test's times
        traits, and each active base segment's condition as (operation, ...) tuples."""
        index = {tid: n for n, tid in enumerate(self._traits)}
        traits = tuple(
            (
                t.id,
                _KIND_CODES[t.kind],
                t.keep,
                float(t.keep_for),
                tuple(self._by_trait.get(t.id, ())),
            )
            for t in self._traits.values()
        )
        tests = {}
        for test, updates in self._updates.items():
            # Times and decaying scores run in the kernel; the other kinds in _record.
            native = tuple(
                (index[u.trait.id], u.points, u.half_life)
                for u in updates
                if u.trait.kind in (TIMES, DECAY)
            )
            tests[test] = (native, any(u.trait.kind not in (TIMES, DECAY) for u in updates))

        def program(cond: Condition) -> tuple[Any, ...]:
            if isinstance(cond, Not):
                return (_NOT, program(cond.part))
            if isinstance(cond, All) or not isinstance(cond, _LEAF_TYPES):
                return (_ALL if isinstance(cond, All) else _ANY, tuple(map(program, cond.parts)))
            ids = self._leaf_ids[id(cond)]
            trait = index[ids[0]]
            if isinstance(cond, CountWithin):
                at_most = -1 if cond.at_most is None else cond.at_most
                return (_COUNT, trait, cond.at_least, at_most, float(cond.within))
            if isinstance(cond, NotSeenWithin):
                return (_LAPSED, trait, float(cond.within), float(cond.lookback))
            if isinstance(cond, FirstSeenWithin):
                return (_FIRST, trait, float(cond.within), float(cond.memory))
            if isinstance(cond, SequenceRule):
                return (_DONE, index[ids[-1]], float(cond.within))
            if isinstance(cond, Score) and cond.half_life is not None:
                least = float(cond.at_least)
                return (_DECAYED, trait, float(cond.half_life), float(cond.memory), least)
            if isinstance(cond, Score) and cond.within is not None:
                points = tuple(float(e.points) for e in cond.entries)
                traits = tuple(index[t] for t in ids)
                return (_WINDOWED, traits, points, float(cond.within), float(cond.at_least))
            return (_PY, self._leaf_check(cond))  # sums and averages: math.fsum, in Python

        checks = []
        for seg in self._active_base:
            assert seg.rule is not None
            ttl = None
            if seg.ttl is not None:
                ttl = (_TTL, tuple(index[t] for t in self._segment_traits[seg.id]), float(seg.ttl))
            checks.append((seg.id, program(seg.rule), ttl))
        return Kernel(traits, tests, tuple(checks))

    # -- ingest -------------------------------------------------------------------------------
    @property
    def tests(self) -> Mapping[str, Predicate]:
        """Every distinct event test, by the id ``matching_traits`` returns."""
        return self._tests

    @property
    def base_segment_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.ruleset.base_segments)

    def record(
        self,
        history: History,
        ts: float,
        trait_ids: Iterable[str],
        now: float,
        event: Mapping[str, Any] | None = None,
    ) -> None:
        """Add one event's matches to the history and drop what no rule can still use.

        ``event`` is needed when a sum or average reads a value from it.
        """
        kernel = self._kernel
        if kernel is None:
            self._record(history, ts, trait_ids, now, event, all_kinds=True)
            return
        if not isinstance(trait_ids, tuple | list):
            trait_ids = tuple(trait_ids)  # read twice below
        # The kernel records times and decaying scores, and says if another kind was fed.
        if kernel.record(history, ts, trait_ids, now):
            self._record(history, ts, trait_ids, now, event, all_kinds=False)

    def _record(
        self,
        history: History,
        ts: float,
        trait_ids: Iterable[str],
        now: float,
        event: Mapping[str, Any] | None,
        *,
        all_kinds: bool,
    ) -> None:
        """record() in Python; ``all_kinds=False`` leaves times and decaying scores to the
        kernel (no other kind reads them, and sequences are completed last, from times
        the kernel has already added)."""
        done: list[_Update] = []
        for test in trait_ids:
            for update in self._updates.get(test, ()):
                trait = update.trait
                kind = trait.kind
                if kind == DONE:
                    # A late first step can still complete a recent sequence: the steps'
                    # own times decide, after every step's time is in.
                    if update not in done:
                        done.append(update)
                    continue
                if not all_kinds and kind in (TIMES, DECAY):
                    continue
                if ts <= now - trait.keep_for:
                    continue  # too late to count anywhere
                if kind == TIMES:
                    stamps = history.get(trait.id)
                    if not stamps:
                        history[trait.id] = [ts]
                        continue
                    if ts >= stamps[-1]:
                        stamps.append(ts)
                    else:
                        bisect.insort(stamps, ts)
                    if stamps[0] <= now - trait.keep_for:
                        _cut_times(stamps, trait, now)
                    elif len(stamps) > trait.keep:  # none expired: drop the oldest past keep
                        del stamps[: len(stamps) - trait.keep]
                elif kind == VALUES:
                    if event is None:
                        raise ValueError("record() needs the event: a sum/average reads it")
                    value = number_at(event, update.path)
                    if value is not None:
                        entries = history.setdefault(trait.id, [])
                        bisect.insort(entries, [ts, value])
                        _cut(entries, trait, now)
                elif kind == FIRST:
                    state = history.get(trait.id)
                    if state is None or state[1] <= now - trait.keep_for:
                        history[trait.id] = [ts, ts]
                    else:
                        state[0], state[1] = min(state[0], ts), max(state[1], ts)
                else:
                    _add_points(history, trait, update, ts, now)
        for update in done:  # after every step's time is in
            completed = _latest_completion([history.get(s, []) for s in update.steps], update.span)
            trait = update.trait
            if completed is not None and completed > now - trait.keep_for:
                state = history.get(trait.id)
                if state is None or completed > state[0]:
                    history[trait.id] = [completed]

    def prune(self, history: History, now: float) -> None:
        """Drop entries older than their trait keeps them, and traits no rule uses."""
        if self._kernel is not None:
            self._kernel.prune(history, now)
            return
        for tid in list(history):
            trait = self._traits.get(tid)
            if trait is None:
                del history[tid]  # no rule uses this state any more
                continue
            state = history[tid]
            if trait.kind == TIMES:
                # Most states have nothing to drop: tell without a bisect.
                if state and len(state) <= trait.keep and state[0] > now - trait.keep_for:
                    continue
                _cut_times(state, trait, now)
            elif trait.kind == VALUES:
                _cut(state, trait, now)
            elif not state or state[-1 if trait.kind == FIRST else 0] <= now - trait.keep_for:
                state.clear()
            if not state:
                del history[tid]

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, history: History, now: float) -> Evaluation:
        """Memberships at ``now`` and the earliest time they can change with no new event."""
        if self._kernel is not None:
            held, next_change = self._kernel.evaluate(history, now)
            return Evaluation(frozenset(held), next_change)
        candidates: set[int] = set()
        by_trait = self._by_trait
        for tid in history:
            found = by_trait.get(tid)
            if found is not None:
                candidates.update(found)
        members: set[str] = set()
        changes: list[float] = []
        checks = self._checks
        # A rule never holds without its state (rules that would are refused at load time).
        for n in sorted(candidates):
            seg_id, holds, within_ttl = checks[n]
            if holds(history, now, changes) and (
                within_ttl is None or within_ttl(history, now, changes)
            ):
                members.add(seg_id)
        return Evaluation(frozenset(members), min(changes) if changes else None)

    def _check(self, cond: Condition) -> _Holds:
        """``cond`` as a closure over (history, now, change times): evaluate() runs one per
        candidate segment per touched cookie, and walking the condition tree with
        isinstance tests was most of a batch's cost with 1,000 segments."""
        if isinstance(cond, Not):
            inner = self._check(cond.part)
            return lambda h, now, ch: not inner(h, now, ch)
        if isinstance(cond, All) or not isinstance(
            cond, CountWithin | NotSeenWithin | FirstSeenWithin | Aggregate | SequenceRule | Score
        ):
            parts = tuple(self._check(p) for p in cond.parts)
            every = isinstance(cond, All)

            def combined(h: History, now: float, ch: list[float]) -> bool:
                # Every part runs, whatever the first ones said: each adds its change times.
                results = [p(h, now, ch) for p in parts]
                return all(results) if every else any(results)

            return combined
        return self._leaf_check(cond)

    def _leaf_check(self, cond: Leaf) -> _Holds:
        ids = self._leaf_ids[id(cond)]
        tid = ids[0]
        if isinstance(cond, CountWithin):
            at_least, at_most, within = cond.at_least, cond.at_most, cond.within

            def count(h: History, now: float, ch: list[float]) -> bool:
                stamps = h.get(tid)
                if not stamps:
                    return at_least <= 0
                # _count_within inlined: the commonest leaf, run per candidate segment.
                start = bisect.bisect_right(stamps, now - within)
                n = len(stamps) - start
                if n:
                    ch.append(stamps[start] + within)
                return at_least <= n and (at_most is None or n <= at_most)

            return count
        if isinstance(cond, NotSeenWithin):
            lapsed = cond
            return lambda h, now, ch: _lapsed(h.get(tid), lapsed, now, ch)
        if isinstance(cond, FirstSeenWithin):
            first = cond

            def first_seen(h: History, now: float, ch: list[float]) -> bool:
                state = h.get(tid)
                if not state or state[1] <= now - first.memory:
                    return False
                if state[0] > now - first.within:
                    ch.append(state[0] + first.within)
                    return True
                return False

            return first_seen
        if isinstance(cond, Aggregate):
            aggregate = cond
            return lambda h, now, ch: _aggregate(h.get(tid, ()), aggregate, now, ch)
        if isinstance(cond, SequenceRule):
            done, span = ids[-1], cond.within

            def sequence(h: History, now: float, ch: list[float]) -> bool:
                state = h.get(done)
                if state and state[0] > now - span:
                    ch.append(state[0] + span)
                    return True
                return False

            return sequence
        score = cond
        if score.within is not None:
            window = score.within
            entries = tuple(zip((e.points for e in score.entries), ids, strict=True))

            def windowed(h: History, now: float, ch: list[float]) -> bool:
                total = 0.0
                for points, t in entries:
                    total += points * _count_within(h.get(t, ()), now, window, ch)
                return total >= score.at_least

            return windowed
        return lambda h, now, ch: _decayed_holds(h.get(tid), score, now, ch)

    def _ttl_check(self, seg: Segment) -> _Holds | None:
        if seg.ttl is None:
            return None
        ttl = seg.ttl
        traits = tuple((t, self._traits[t].kind) for t in self._segment_traits[seg.id])

        def within_ttl(h: History, now: float, ch: list[float]) -> bool:
            newest = max(
                (_last_time(kind, h[t]) for t, kind in traits if h.get(t)),
                default=None,
            )
            if newest is None or newest + ttl <= now:
                return False
            ch.append(newest + ttl)
            return True

        return within_ttl

    def with_composites(self, base_members: Iterable[str]) -> list[str]:
        """Active base memberships plus every active composite they satisfy, in file order.

        A paused segment is built (for a backfill) but answered nowhere: as a part of a
        composite it counts as not held, as lookups count it (dmp/replica.py).
        """
        members = set(base_members) & self._active_base_ids
        for seg in self._composites:
            assert seg.of is not None
            if evaluate_composite(seg.of, members):
                members.add(seg.id)
        return [s.id for s in self.ruleset.segments if s.id in members]


# -- state helpers ---------------------------------------------------------------------------------
def _time(entry: Any) -> float:
    return float(entry[0]) if isinstance(entry, list) else float(entry)


def _cut(entries: list[Any], trait: Trait, now: float) -> None:
    """Drop entries older than the trait keeps them, and all but the newest ``keep``."""
    cut = bisect.bisect_right(entries, now - trait.keep_for, key=_time)
    drop = max(cut, len(entries) - trait.keep)
    if drop > 0:
        del entries[:drop]


def _cut_times(stamps: list[float], trait: Trait, now: float) -> None:
    cut = bisect.bisect_right(stamps, now - trait.keep_for)
    drop = max(cut, len(stamps) - trait.keep)
    if drop > 0:
        del stamps[:drop]


def _last_time(kind: str, state: list[Any]) -> float:
    if kind == FIRST:
        return float(state[1])
    if kind in (DECAY, DONE):
        return float(state[0])
    return _time(state[-1])


def _count_within(stamps: Any, now: float, within: float, changes: list[float]) -> int:
    start = bisect.bisect_right(stamps, now - within)
    if start < len(stamps):
        # The count can only drop when the oldest time in the window leaves it.
        changes.append(stamps[start] + within)
    return len(stamps) - start


def _lapsed(
    stamps: list[float] | None, cond: NotSeenWithin, now: float, changes: list[float]
) -> bool:
    if not stamps:
        return False
    last = stamps[-1]
    if last > now - cond.within:
        changes.append(last + cond.within)  # lapses then
        return False
    if last > now - cond.lookback:
        changes.append(last + cond.lookback)  # forgotten then
        return True
    return False


def _aggregate(entries: Any, cond: Aggregate, now: float, changes: list[float]) -> bool:
    start = bisect.bisect_right(entries, now - cond.within, key=_time)
    if start < len(entries):
        changes.append(entries[start][0] + cond.within)
    values = [v for _, v in entries[start:]]
    if cond.func == "sum":
        x = math.fsum(values)
    elif values:
        x = math.fsum(values) / len(values)
    else:
        return False
    return (cond.at_least is None or x >= cond.at_least) and (
        cond.at_most is None or x <= cond.at_most
    )


def _add_points(history: History, trait: Trait, update: _Update, ts: float, now: float) -> None:
    state = history.get(trait.id)
    if state is None or state[0] <= now - trait.keep_for:
        history[trait.id] = [ts, update.points]
        return
    ref, score = state
    if ts >= ref:
        history[trait.id] = [ts, score * math.exp2(-(ts - ref) / update.half_life) + update.points]
    else:
        state[1] = score + update.points * math.exp2(-(ref - ts) / update.half_life)


def _decayed_holds(
    state: list[float] | None, cond: Score, now: float, changes: list[float]
) -> bool:
    if not state or state[0] <= now - cond.memory or state[1] <= 0:
        return False
    assert cond.half_life is not None
    ref, score = state
    # Compare times, not scores: at the crossing time the cookie is out, exactly once.
    crossing = ref + cond.half_life * math.log2(score / cond.at_least)
    if now < crossing:
        changes.append(min(crossing, ref + cond.memory))
        return True
    return False


def _latest_completion(steps: list[list[float]], span: float) -> float | None:
    """The latest time the last step completes the sequence: for each last-step time,
    newest first, walk back taking the newest earlier time of each step (which leaves the
    most room), and accept when the first step is within ``span``."""
    *before, last = steps
    for end in reversed(last):
        t = end
        for stamps in reversed(before):
            i = bisect.bisect_left(stamps, t) - 1
            if i < 0:
                t = -math.inf
                break
            t = stamps[i]
        if end - t <= span:
            return end
    return None
