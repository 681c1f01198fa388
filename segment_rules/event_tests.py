"""Event tests compiled to closures: the fast twin of interpreter.test_event."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

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


_URL = re.compile(r"(?:([A-Za-z][A-Za-z0-9+.-]*):)?(?://([^/?#]*))?([^?#]*)")


@lru_cache(maxsize=1024)
def url_parts(url: str) -> tuple[str, str]:
    """(host, path) of a URL as urllib.parse.urlsplit reads them (host lower-cased, without
    user or port; '' when there is none). Cached: several tests of one event read one URL."""
    match = _URL.match(url)
    assert match is not None  # every part of the pattern is optional
    netloc, path = match.group(2) or "", match.group(3)
    host = netloc.rpartition("@")[2]
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    else:
        host = host.partition(":")[0]
    return (host.lower(), path)


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
        if len(parts) == 2:
            first, second = parts
            return lambda e: first(e) and second(e)

        def all_of(e: Event) -> bool:
            # Plain loops here and below: a generator costs more than the test on the hot path.
            for p in parts:  # noqa: SIM110
                if not p(e):
                    return False
            return True

        return all_of

    def any_of(e: Event) -> bool:
        for p in parts:  # noqa: SIM110
            if p(e):
                return True
        return False

    return any_of


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

    def any_value(e: Event) -> bool:
        raw = get(e)
        if raw is None:
            return False
        if type(raw) is list:
            for v in raw:  # noqa: SIM110
                if check(v):
                    return True
            return False
        return check(raw)

    return any_value


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
        return url_parts(v) if type(v) is str else None

    if op == "host":
        return lambda v: (p := parts(v)) is not None and p[0] == want
    if op == "host_suffix":
        dotted = "." + want
        return lambda v: (p := parts(v)) is not None and (p[0] == want or p[0].endswith(dotted))

    def path_starts(v: Any) -> bool:
        if type(v) is not str:
            return False
        # Fast path for 'http(s)://host/path...' without parsing: the path starts at the
        # first '/' after the host, unless a '?' or '#' ends the host first (empty path).
        if v.startswith("https://"):
            start = 8
        elif v.startswith("http://"):
            start = 7
        else:
            return url_parts(v)[1].startswith(want)
        end = v.find("/", start)
        if end < 0 or "?" in v[start:end] or "#" in v[start:end]:
            return False
        return v.startswith(want, end)

    return path_starts
