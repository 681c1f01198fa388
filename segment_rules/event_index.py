"""Which tests can an event pass? An index, so an event meets only its candidate tests.

Each test is filed under the event ``type`` it requires (or under every type when it
requires none), then under one *anchor*: a conjunct that a dictionary lookup can decide
(equals / in, a category ``under``, an IAB id ``under_iab``, a URL ``host`` or
``host_suffix``). At match time the event's type picks a bucket; each anchored field of
the bucket costs a lookup per value; only the tests found there, and the few tests
without an anchor, run their remaining conjuncts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from segment_rules.event_tests import (
    Event,
    EventTest,
    as_values,
    compile_predicate,
    getter,
    url_parts,
)
from segment_rules.model import All, FieldTest, Predicate

# Hits of one lookup: (test id, what else must hold or None when the anchor decides).
Hits = list[tuple[str, EventTest | None]]
Collect = Callable[[Event, list[str]], None]
_HASHABLE = (str, int, float, bool)
_LOW_SELECTIVITY = {("geo", "country"), ("geo", "region"), ("type",)}
_ANCHOR_OPS = ("equals", "in", "under", "under_iab", "host", "host_suffix")


def _conjuncts(pred: Predicate) -> list[Predicate]:
    if isinstance(pred, All):
        found: list[Predicate] = []
        for part in pred.parts:
            found.extend(_conjuncts(part))
        return found
    return [pred]


def _anchor_keys(test: FieldTest) -> tuple[str, list[Any]]:
    """(lookup mode, keys) for an anchor conjunct."""
    if test.op == "equals":
        return ("eq", [test.value])
    if test.op == "in":
        assert isinstance(test.value, frozenset)
        return ("eq", sorted(test.value, key=repr))
    if test.op == "under_iab":
        return ("iab", sorted(test.expanded))
    mode = {"under": "under", "host": "host", "host_suffix": "domain"}[test.op]
    return (mode, [test.value])


class _Bucket:
    def __init__(self) -> None:
        self.groups: dict[tuple[tuple[str, ...], str], dict[Any, Hits]] = {}
        self.always: list[str] = []
        self.residual: list[tuple[str, EventTest]] = []

    def add(self, test_id: str, conjuncts: list[Predicate]) -> None:
        anchors = [c for c in conjuncts if isinstance(c, FieldTest) and c.op in _ANCHOR_OPS]
        if not anchors:
            if conjuncts:
                self.residual.append((test_id, compile_predicate(All(tuple(conjuncts)))))
            else:
                self.always.append(test_id)
            return
        anchor = min(anchors, key=lambda a: (a.path in _LOW_SELECTIVITY, len(_anchor_keys(a)[1])))
        rest = [c for c in conjuncts if c is not anchor]
        check = compile_predicate(All(tuple(rest))) if rest else None
        mode, keys = _anchor_keys(anchor)
        table = self.groups.setdefault((anchor.path, mode), {})
        for key in keys:
            table.setdefault(key, []).append((test_id, check))

    def compile(self) -> Callable[[Event], list[str]]:
        collectors = [_collector(path, mode, table) for (path, mode), table in self.groups.items()]
        always, residual = tuple(self.always), tuple(self.residual)

        def match(event: Event) -> list[str]:
            out = list(always)
            for collect in collectors:
                collect(event, out)
            for test_id, check in residual:
                if check(event):
                    out.append(test_id)
            return list(dict.fromkeys(out)) if len(out) > 1 else out

        return match


def _emit(hits: Hits, event: Event, out: list[str]) -> None:
    for test_id, check in hits:
        if check is None or check(event):
            out.append(test_id)


def _collector(path: tuple[str, ...], mode: str, table: dict[Any, Hits]) -> Collect:
    get = getter(path)
    lookup = table.get
    if mode == "eq":

        def eq(event: Event, out: list[str]) -> None:
            raw = get(event)
            if raw is None:
                return
            for v in raw if type(raw) is list else (raw,):
                if isinstance(v, _HASHABLE) and (hits := lookup(v)) is not None:
                    _emit(hits, event, out)

        return eq
    if mode == "iab":

        def iab(event: Event, out: list[str]) -> None:
            for v in as_values(get(event)):
                if type(v) in (str, int) and (hits := lookup(str(v))) is not None:
                    _emit(hits, event, out)

        return iab
    if mode == "under":

        def under(event: Event, out: list[str]) -> None:
            for v in as_values(get(event)):
                if not isinstance(v, str):
                    continue
                cut = v.find("/")
                while cut > 0:
                    if (hits := lookup(v[:cut])) is not None:
                        _emit(hits, event, out)
                    cut = v.find("/", cut + 1)
                if (hits := lookup(v)) is not None:
                    _emit(hits, event, out)

        return under
    suffixes = mode == "domain"

    def host(event: Event, out: list[str]) -> None:
        for v in as_values(get(event)):
            parts = url_parts(v) if isinstance(v, str) else None
            if not parts:
                continue
            name = parts[0]
            while True:
                if (hits := lookup(name)) is not None:
                    _emit(hits, event, out)
                dot = name.find(".") if suffixes else -1
                if dot < 0:
                    break
                name = name[dot + 1 :]

    return host


class EventIndex:
    """``match(event)``: the ids of the tests the event passes, each once."""

    def __init__(self, tests: Mapping[str, Predicate]) -> None:
        self._all = [(test_id, compile_predicate(pred)) for test_id, pred in tests.items()]
        typed: dict[str, list[tuple[str, list[Predicate]]]] = {}
        untyped: list[tuple[str, list[Predicate]]] = []
        for test_id, pred in tests.items():
            conjuncts = _conjuncts(pred)
            kind = next(
                (
                    c
                    for c in conjuncts
                    if isinstance(c, FieldTest) and c.path == ("type",) and c.op in ("equals", "in")
                ),
                None,
            )
            if kind is None:
                untyped.append((test_id, conjuncts))
                continue
            rest = [c for c in conjuncts if c is not kind]
            values = kind.value if isinstance(kind.value, frozenset) else {kind.value}
            for value in values:
                if isinstance(value, str):
                    typed.setdefault(value, []).append((test_id, rest))
        self._buckets: dict[str, Callable[[Event], list[str]]] = {}
        for type_name, entries in typed.items():
            bucket = _Bucket()
            for test_id, conjuncts in entries + untyped:
                bucket.add(test_id, conjuncts)
            self._buckets[type_name] = bucket.compile()
        default = _Bucket()
        for test_id, conjuncts in untyped:
            default.add(test_id, conjuncts)
        self._default = default.compile()

    def match(self, event: Event) -> list[str]:
        kind = event.get("type")
        if type(kind) is str:
            return self._buckets.get(kind, self._default)(event)
        if kind is None:
            return self._default(event)
        # Not an event of format v1 (a list or a number as type): test everything.
        return [test_id for test_id, check in self._all if check(event)]
