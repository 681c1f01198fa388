"""Whole-file checks after parsing: rules that hold for everyone (errors), and rules that
can never match or duplicate another (warnings)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from segment_rules.canonical import composite_form, condition_form
from segment_rules.errors import RuleError
from segment_rules.fields import EVENT_TYPES, field_kind
from segment_rules.graph import evaluate_composite, refs
from segment_rules.model import (
    Aggregate,
    All,
    AnyOf,
    Composite,
    Condition,
    CountWithin,
    FieldTest,
    FirstSeenWithin,
    Not,
    NotSeenWithin,
    Predicate,
    RuleWarning,
    Scalar,
    Score,
    Segment,
    SequenceRule,
)

MAX_BRUTE_FORCE_REFS = 12


def check_rules(segments: Sequence[Segment]) -> list[RuleError]:
    errors = []
    for seg in segments:
        if seg.rule is not None and holds_without_events(seg.rule):
            errors.append(
                seg.loc.error(
                    f"segment '{seg.id}' would hold for every cookie without matching events "
                    "('at_most', 'not' or a sum 'at_most' alone); combine it under 'all' with a "
                    "condition that needs an event, e.g. 'at_least: 1'"
                )
            )
    return errors


def holds_without_events(cond: Condition) -> bool:
    if isinstance(cond, CountWithin):
        return cond.at_least == 0
    if isinstance(cond, Aggregate):
        # The sum of no events is 0; the average of no events is undefined (no match).
        return (
            cond.func == "sum"
            and (cond.at_least is None or cond.at_least <= 0)
            and (cond.at_most is None or cond.at_most >= 0)
        )
    if isinstance(cond, NotSeenWithin | FirstSeenWithin | SequenceRule | Score):
        return False
    if isinstance(cond, Not):
        return not holds_without_events(cond.part)
    results = [holds_without_events(p) for p in cond.parts]
    return all(results) if isinstance(cond, All) else any(results)


def rule_warnings(segments: Sequence[Segment]) -> list[RuleWarning]:
    warnings: list[RuleWarning] = []
    never: set[str] = set()
    for seg in segments:
        if seg.rule is not None and not condition_can_match(seg.rule):
            never.add(seg.id)
            warnings.append(
                _warn(
                    seg,
                    f"segment '{seg.id}' can never match: its event tests contradict each other "
                    "(e.g. two different values of one field under 'all', or an unknown event "
                    f"type; event types are {', '.join(EVENT_TYPES)}); fix the tests",
                )
            )
    for seg in segments:
        if seg.of is not None and not _composite_can_match(seg.of, never):
            never.add(seg.id)
            warnings.append(
                _warn(
                    seg,
                    f"segment '{seg.id}' can never hold anyone: no combination of its parts "
                    "satisfies 'of:'; fix the and/or/not",
                )
            )
    warnings.extend(_duplicates(segments))
    return sorted(warnings, key=lambda w: (w.line, w.column))


def _warn(seg: Segment, message: str) -> RuleWarning:
    return RuleWarning(seg.loc.file, seg.loc.line, seg.loc.column, message)


def _duplicates(segments: Iterable[Segment]) -> Iterable[RuleWarning]:
    first: dict[str, Segment] = {}
    for seg in segments:
        if seg.rule is not None:
            key = repr(("rule", condition_form(seg.rule), seg.ttl))
        else:
            assert seg.of is not None
            key = repr(("of", composite_form(seg.of)))
        if key in first:
            other = first[key]
            yield _warn(
                seg,
                f"segment '{seg.id}' duplicates '{other.id}' (line {other.loc.line}): the same "
                "rule gives the same audience; remove one or change it",
            )
        else:
            first[key] = seg


# -- can a rule ever match? (conservative: False only when certain) ----------------------------
def condition_can_match(cond: Condition) -> bool:
    if isinstance(cond, CountWithin):
        return cond.at_least == 0 or predicate_can_match(cond.where)
    if isinstance(cond, NotSeenWithin | FirstSeenWithin | Aggregate):
        return predicate_can_match(cond.where)
    if isinstance(cond, SequenceRule):
        return all(predicate_can_match(s) for s in cond.steps)
    if isinstance(cond, Score):
        return any(predicate_can_match(e.where) for e in cond.entries)
    if isinstance(cond, Not):
        return True
    results = [condition_can_match(p) for p in cond.parts]
    return all(results) if isinstance(cond, All) else any(results)


def predicate_can_match(pred: Predicate) -> bool:
    if isinstance(pred, FieldTest):
        return _test_can_match(pred)
    if isinstance(pred, Not):
        return True
    if isinstance(pred, AnyOf):
        return any(predicate_can_match(p) for p in pred.parts)
    if not all(predicate_can_match(p) for p in pred.parts):
        return False
    return _conjunction_can_match([p for p in pred.parts if isinstance(p, FieldTest)])


def _test_can_match(test: FieldTest) -> bool:
    if test.path == ("type",) and test.op in ("equals", "in"):
        wanted = test.value if isinstance(test.value, frozenset) else {test.value}
        return any(v in EVENT_TYPES for v in wanted)
    return True


def _conjunction_can_match(tests: list[FieldTest]) -> bool:
    """Contradictions between tests of one single-valued field under 'all'."""
    by_field: dict[tuple[str, ...], list[FieldTest]] = {}
    for test in tests:
        if field_kind(test.path) == "str":  # one value per event; lists and attrs may hold many
            by_field.setdefault(test.path, []).append(test)
    for group in by_field.values():
        allowed: set[Scalar] | None = None
        excluded: set[Scalar] = set()
        missing = present = False
        for test in group:
            if test.op in ("equals", "in"):
                values = _values(test)
                allowed = values if allowed is None else allowed & values
            elif test.op in ("not_equals", "not_in"):
                excluded |= _values(test)
            elif test.op == "missing":
                missing = True
            if test.op not in ("not_equals", "not_in", "missing"):
                present = True
        if missing and present:
            return False
        if allowed is not None and not (allowed - excluded):
            return False
    return True


def _values(test: FieldTest) -> set[Scalar]:
    value = test.value
    if isinstance(value, frozenset):
        return set(value)
    if isinstance(value, str | int | float | bool):
        return {value}
    return set()


def _composite_can_match(expr: Composite, never: set[str]) -> bool:
    names = sorted({r.segment_id for r in refs(expr)} - never)
    if len(names) > MAX_BRUTE_FORCE_REFS:
        return True
    for size in range(len(names) + 1):
        for chosen in itertools.combinations(names, size):
            if evaluate_composite(expr, frozenset(chosen)):
                return True
    return False
