"""The compiled matcher in front of the generated Python one (segment_rules/_fastmatch.c).

The C object answers an event from remembered answers per group of tests (the groups of
segment_rules.event_index: one event type's tests, split by the fields they read), with
each value of a key turned into a small integer once. It falls back to the generated
Python for anything it does not keep (numbers, true/false, objects, odd URLs), and calls a
group's own indexed matcher for a key it has not seen yet. Decision 0011 has the numbers.

Two things make its keys repeat more than the Python memos' (so fewer misses):
- **Elementwise groups.** A group reading one field whose every test is a positive test
  of one value (a list passes when any element passes: ``equals``, ``in``, ``under``,
  ``prefix`` ...) is remembered per element; a list's answer is the union of its
  elements'. A page view's 1-3 categories make ever-new lists of few categories.
- **URL cut to what the tests can tell apart.** An http(s) URL in a field some host or
  path prefix test reads, and otherwise only prefix, exists and missing tests, keeps, past
  the host's '/', as much of the path as some ``path_prefix`` value shares with it (and of
  the text as some ``prefix`` value shares): ``/item-17`` and ``/item-18`` are one key
  when no path prefix starts ``/i``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from segment_rules.event_memo import Matched
from segment_rules.event_tests import Event
from segment_rules.model import AnyOf, FieldTest, Predicate

if TYPE_CHECKING:
    from segment_rules.event_index import Branch

try:
    from segment_rules._fastmatch import Matcher
except ImportError:  # not built (pip install -e . builds it): the generated Python answers
    Matcher = None  # type: ignore[assignment,misc]  # a class when built, else None

__all__ = ["FAST_LIMIT", "Matcher", "available", "elementwise", "fast_matcher"]

# Ids (texts, list cells, group keys) before everything is dropped and learnt again:
# about 60 bytes an id, so ~64 MB at the limit.
FAST_LIMIT = 1 << 20
# Tests that hold on a list when any element passes, and on a value as on [value].
_EXISTENTIAL = frozenset(
    {
        "equals",
        "in",
        "under",
        "under_iab",
        "prefix",
        "suffix",
        "contains",
        "regex",
        "host",
        "host_suffix",
        "path_prefix",
        "gt",
        "gte",
        "lt",
        "lte",
        "between",
    }
)
_CUTTABLE = frozenset({"host", "host_suffix", "path_prefix", "prefix", "exists", "missing"})
# Only a field some test reads as a URL is cut: text that is not an http(s) URL goes to the
# generated Python, which a field read only by prefix, exists or missing tests (a search
# query, a list of categories) would then take for every value.
_URL_TESTS = frozenset({"host", "host_suffix", "path_prefix"})


def available() -> bool:
    return Matcher is not None


def _existential(pred: Predicate, path: tuple[str, ...]) -> bool:
    if isinstance(pred, FieldTest):
        return pred.path == path and pred.op in _EXISTENTIAL
    if isinstance(pred, AnyOf):
        return all(_existential(part, path) for part in pred.parts)
    return False


def elementwise(
    paths: tuple[tuple[str, ...], ...], entries: Sequence[tuple[str, list[Predicate]]]
) -> bool:
    """Whether a group's answer for a list is the union of its answers for each element."""
    if len(paths) != 1:
        return False
    return all(len(conj) == 1 and _existential(conj[0], paths[0]) for _, conj in entries)


def _field_spec(path: tuple[str, ...], tests: Sequence[FieldTest]) -> tuple[Any, ...]:
    reading = [t for t in tests if t.path == path]
    url = any(t.op in _URL_TESTS for t in reading) and all(t.op in _CUTTABLE for t in reading)
    path_prefixes = tuple(sorted({str(t.value) for t in reading if t.op == "path_prefix"}))
    text_prefixes = tuple(sorted({str(t.value) for t in reading if t.op == "prefix"}))
    keys = tuple(sys.intern(k) for k in path)
    return (keys, url, path_prefixes if url else (), text_prefixes if url else ())


def _interned(found: Sequence[str]) -> Matched:
    # Each id once, and the same object for equal ids: the C side unions by identity.
    return tuple(dict.fromkeys(map(sys.intern, found)))


def _filler(match: Callable[[Event], Sequence[str]]) -> Callable[[Event], Matched]:
    return lambda event: _interned(match(event))


def _element_filler(
    match: Callable[[Event], Sequence[str]], path: tuple[str, ...]
) -> Callable[[Any], Matched]:
    def fill(element: Any) -> Matched:
        event: dict[str, Any] = {path[-1]: element}
        for key in reversed(path[:-1]):
            event = {key: event}
        return _interned(match(event))

    return fill


def _branch_spec(branch: Branch) -> tuple[Any, ...]:
    paths = sorted({p for g in branch.groups for p in g.paths})
    number = {p: n for n, p in enumerate(paths)}
    fields = tuple(_field_spec(p, branch.field_tests) for p in paths)
    groups = []
    for group, entries in zip(branch.groups, branch.entries, strict=True):
        each = elementwise(group.paths, entries)
        fill = _element_filler(group.match, group.paths[0]) if each else _filler(group.match)
        groups.append((tuple(number[p] for p in group.paths), each, fill))
    return (fields, tuple(groups), _interned(branch.always))


def fast_matcher(
    branches: Mapping[str, Branch],
    default: Branch,
    fallback: Callable[[Event], Matched],
    limit: int = FAST_LIMIT,
) -> Callable[[Event], Matched]:
    """The C matcher over these branches (type -> branch), or ``fallback`` when not built."""
    if not available():
        return fallback
    names = list(branches)
    specs = (*(_branch_spec(branches[name]) for name in names), _branch_spec(default))
    branch_of = {name: n for n, name in enumerate(names)}
    matcher: Callable[[Event], Matched] = Matcher(specs, branch_of, len(names), fallback, limit)
    return matcher
