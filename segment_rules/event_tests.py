"""Event tests compiled to closures: the fast twin of interpreter.test_event."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from segment_rules.model import All, FieldTest, Not, Predicate
from segment_rules.patterns import searcher

Event = Mapping[str, Any]
EventTest = Callable[[Event], bool]
Getter = Callable[[Event], Any]
_HASHABLE = (str, int, float, bool)


def getter(path: tuple[str, ...]) -> Getter:
    """The raw value at ``path`` (a scalar, a list or None)."""
    if len(path) == 1:
        (key,) = path
        return lambda e: e.get(key)
    if len(path) == 2:
        first, second = path

        def get2(e: Event) -> Any:
            node = e.get(first)
            return node.get(second) if isinstance(node, dict) else None

        return get2

    def get_n(e: Event) -> Any:
        node: Any = e
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    return get_n


def as_values(raw: Any) -> list[Any] | tuple[Any, ...]:
    if raw is None:
        return ()
    return raw if type(raw) is list else (raw,)


@lru_cache(maxsize=8192)
def url_parts(url: str) -> tuple[str, str] | None:
    """(host, path) of a URL; cached because one page's URL repeats across many events."""
    try:
        parts = urlsplit(url)
        return (parts.hostname or "", parts.path)
    except ValueError:
        return None


def compile_predicate(pred: Predicate) -> EventTest:
    if isinstance(pred, FieldTest):
        return compile_field_test(pred)
    if isinstance(pred, Not):
        inner = compile_predicate(pred.part)
        return lambda e: not inner(e)
    parts = tuple(compile_predicate(p) for p in pred.parts)
    if len(parts) == 1:
        return parts[0]
    if isinstance(pred, All):
        return lambda e: all(p(e) for p in parts)
    return lambda e: any(p(e) for p in parts)


def compile_field_test(test: FieldTest) -> EventTest:
    get, op, want = getter(test.path), test.op, test.value
    if op in ("not_equals", "not_in", "missing"):
        positive = {"not_equals": "equals", "not_in": "in", "missing": "exists"}[op]
        inner = compile_field_test(FieldTest(test.path, positive, want))  # type: ignore[arg-type]  # a FieldOp
        return lambda e: not inner(e)
    if op == "exists":
        return lambda e: bool(as_values(get(e)))
    if op == "equals":

        def equals(e: Event) -> bool:
            raw = get(e)
            if type(raw) is list:
                return want in raw
            return raw is not None and raw == want

        return equals
    if op == "in":
        assert isinstance(want, frozenset)

        def in_(e: Event) -> bool:
            raw = get(e)
            if type(raw) is list:
                return any(isinstance(v, _HASHABLE) and v in want for v in raw)
            return isinstance(raw, _HASHABLE) and raw in want

        return in_
    check = _value_check(test)
    return lambda e: any(check(v) for v in as_values(get(e)))


def _value_check(test: FieldTest) -> Callable[[Any], bool]:
    """The test of one value (one element of a list field)."""
    op, want = test.op, test.value
    if op in ("gt", "gte", "lt", "lte", "between"):
        return _number_check(op, want)
    if op == "under_iab":
        ids = test.expanded
        return lambda v: type(v) in (str, int) and str(v) in ids
    if op in ("host", "host_suffix", "path_prefix"):
        assert isinstance(want, str)
        return _url_check(op, want)
    assert isinstance(want, str)
    if op == "prefix":
        return lambda v: isinstance(v, str) and v.startswith(want)
    if op == "suffix":
        return lambda v: isinstance(v, str) and v.endswith(want)
    if op == "contains":
        return lambda v: isinstance(v, str) and want in v
    if op == "regex":
        found = searcher(want)
        return lambda v: isinstance(v, str) and found(v)
    assert op == "under"
    below = want + "/"
    return lambda v: isinstance(v, str) and (v == want or v.startswith(below))


def _number_check(op: str, want: object) -> Callable[[Any], bool]:
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if op == "between":
        assert isinstance(want, tuple)
        low, high = want
        return lambda v: number(v) and low <= v <= high
    assert isinstance(want, float)
    bound = want
    if op == "gt":
        return lambda v: number(v) and v > bound
    if op == "gte":
        return lambda v: number(v) and v >= bound
    if op == "lt":
        return lambda v: number(v) and v < bound
    return lambda v: number(v) and v <= bound


def _url_check(op: str, want: str) -> Callable[[Any], bool]:
    def parts(v: Any) -> tuple[str, str] | None:
        return url_parts(v) if isinstance(v, str) else None

    if op == "host":
        return lambda v: (p := parts(v)) is not None and p[0] == want
    if op == "host_suffix":
        dotted = "." + want
        return lambda v: (p := parts(v)) is not None and (p[0] == want or p[0].endswith(dotted))
    return lambda v: (p := parts(v)) is not None and p[1].startswith(want)
