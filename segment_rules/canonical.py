"""Canonical, JSON-able forms of rule trees: stable ids for history and duplicate checks.

A v1 test's form is unchanged from rules v1, so history stored under its trait id survives
the upgrade; new kinds of state carry their kind in the form.
"""

from __future__ import annotations

import hashlib

import orjson

from segment_rules.model import (
    Aggregate,
    All,
    Composite,
    Condition,
    CountWithin,
    FieldTest,
    FirstSeenWithin,
    Not,
    NotSeenWithin,
    Predicate,
    Score,
    SegmentRef,
    SequenceRule,
)


def short_hash(form: object) -> str:
    return hashlib.sha1(orjson.dumps(form), usedforsecurity=False).hexdigest()[:12]


def trait_id(pred: Predicate) -> str:
    """A stable id for a test, so stored history survives unrelated rule edits."""
    return short_hash(predicate_form(pred))


def predicate_form(pred: Predicate, *, any_order: bool = False) -> object:
    """``any_order``: all/any parts sorted, so reordered copies compare equal (duplicate
    checks); state ids keep the written order, as rules v1 did."""
    if isinstance(pred, FieldTest):
        value: object = pred.value
        if isinstance(value, frozenset):
            value = sorted(value, key=repr)
        elif isinstance(value, tuple):
            value = list(value)
        form: list[object] = [".".join(pred.path), pred.op, value]
        if pred.expanded:
            form.append(short_hash(sorted(pred.expanded)))  # a new taxonomy is a new test
        return form
    if isinstance(pred, Not):
        return ["not", predicate_form(pred.part, any_order=any_order)]
    tag = "all" if isinstance(pred, All) else "any"
    parts = [predicate_form(p, any_order=any_order) for p in pred.parts]
    return [tag, *(sorted(parts, key=repr) if any_order else parts)]


def _key(pred: Predicate) -> object:
    return predicate_form(pred, any_order=True)


def condition_form(cond: Condition) -> object:
    if isinstance(cond, CountWithin):
        return ["count", cond.at_least, cond.at_most, cond.within, _key(cond.where)]
    if isinstance(cond, NotSeenWithin):
        return ["lapsed", cond.within, cond.lookback, _key(cond.where)]
    if isinstance(cond, FirstSeenWithin):
        return ["first", cond.within, cond.memory, _key(cond.where)]
    if isinstance(cond, Aggregate):
        return [
            cond.func,
            ".".join(cond.path),
            cond.within,
            cond.at_least,
            cond.at_most,
            _key(cond.where),
        ]
    if isinstance(cond, SequenceRule):
        return ["sequence", cond.span, cond.within, *(_key(s) for s in cond.steps)]
    if isinstance(cond, Score):
        return [
            "score",
            cond.at_least,
            cond.within,
            cond.half_life,
            cond.memory,
            sorted(([e.points, _key(e.where)] for e in cond.entries), key=repr),
        ]
    if isinstance(cond, Not):
        return ["not", condition_form(cond.part)]
    tag = "all" if isinstance(cond, All) else "any"
    # Order does not change the meaning of all/any: sort so reordered copies compare equal.
    return [tag, *sorted((condition_form(p) for p in cond.parts), key=repr)]


def composite_form(expr: Composite) -> object:
    if isinstance(expr, SegmentRef):
        return expr.segment_id
    if isinstance(expr, Not):
        return ["not", composite_form(expr.part)]
    tag = "and" if isinstance(expr, All) else "or"
    return [tag, *sorted((composite_form(p) for p in expr.parts), key=repr)]
