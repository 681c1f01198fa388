"""The tests an event passes, remembered per projection of the event onto the fields they read.

Traffic repeats itself: the same categories, the same site and section, the same country and
region. Within one event type, the tests are split into groups by the set of fields they read;
a group's answer is a function of those fields' values alone, so it is looked up in a memo
keyed on them, and the indexed matcher (segment_rules.event_index) runs only on a miss.

Keys are exact: a text value as itself, a list as the tuple of its elements, an ``http(s)``
URL cut after the host plus the longest ``path_prefix`` (or ``prefix``) when those and host
tests are all that read it (nothing past the cut can change their answers). A key holding
anything but text, lists of text and missing values is never stored, because ``1``, ``1.0``
and ``true`` are equal as keys but not to the numeric tests; such events are matched afresh.
A full memo drops its older half (insertion order), so a stream of ever-new values costs a
bounded table and a miss each, never a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from segment_rules.event_tests import Event
from segment_rules.model import FieldTest

Matched = tuple[str, ...]
# Entries per group. About 250 bytes an entry with the index's own caches (81,000 entries
# took 20 MB after 300,000 datagen events with 1,000 segments, in 23 groups): 4 MB a group.
MEMO_LIMIT = 1 << 14
# Ops whose answer on an http(s) URL depends only on its host and the start of its path
# (or of the whole text): the URL may be cut past what they read.
_CUTTABLE = frozenset({"host", "host_suffix", "path_prefix", "prefix", "exists", "missing"})


@dataclass(frozen=True)
class Group:
    """Tests reading the same fields, and the indexed matcher of just those tests."""

    paths: tuple[tuple[str, ...], ...]
    match: Callable[[Event], Sequence[str]]


class _ListMark:
    """First element of a key part made from a list, so no other value can equal it."""


LIST = _ListMark()


def _safe(part: Any) -> bool:
    if type(part) is tuple:
        return part[0] is LIST and all(type(x) is str for x in part[1:])
    return part is None or type(part) is str


def _url_key_ok(part: Any) -> bool:
    """Whether a URL key part may be stored: uncut (not text), or cut from an http(s) URL
    with a '/' after its host (other text may have been cut anywhere: matched afresh)."""
    if type(part) is not str:
        return True
    return part.startswith(("https://", "http://")) and part.find("/", 8) > 0


def _filler(
    group: Group, urls: tuple[int, ...], limit: int
) -> tuple[dict[Any, Matched], Callable[[Event, Any], Matched]]:
    memo: dict[Any, Matched] = {}
    match = group.match
    single = len(group.paths) == 1

    def fill(event: Event, key: Any) -> Matched:
        found = tuple(dict.fromkeys(match(event)))
        parts = (key,) if single else key
        if all(map(_safe, parts)) and all(_url_key_ok(parts[n]) for n in urls):
            if len(memo) >= limit:
                for old in list(islice(memo, max(len(memo) // 2, 1))):
                    del memo[old]
            memo[key] = found
        return found

    return memo, fill


def _url_window(tests: Iterable[FieldTest]) -> tuple[int, int] | None:
    """(path chars, text chars) an http(s) URL key keeps, or None to keep all of it."""
    path = text = 0
    for test in tests:
        if test.op not in _CUTTABLE:
            return None
        if test.op == "path_prefix":
            assert isinstance(test.value, str)
            path = max(path, len(test.value))
        elif test.op == "prefix":
            assert isinstance(test.value, str)
            text = max(text, len(test.value))
    return (path, text)


def _key_part(v: str, window: tuple[int, int] | None, pad: str) -> list[str]:
    """Lines turning the raw value in ``v`` into its key part."""
    if window is None:
        return [f"{pad}if type({v}) is list:", f"{pad}    {v} = (L, *{v})"]
    # Cut after the first '/' past 'http(s)://' plus what path_prefix tests read: the host
    # ends at or before that '/'. Which text is an http(s) URL is checked on a miss only,
    # before storing (segment_rules.event_memo._url_key_ok): a text cut anywhere else holds
    # no '/' after its 8th character, so it never equals a stored key.
    path_chars, text_chars = window
    end = f"{v}.find('/', 8) + {path_chars}"
    if text_chars:
        end = f"max({end}, {text_chars})"
    return [
        f"{pad}if type({v}) is str:",
        f"{pad}    {v} = {v}[:{end}]",
        f"{pad}elif type({v}) is list:",
        f"{pad}    {v} = (L, *{v})",
    ]


def _fetch(
    tree: dict[str, Any], node: str, var: dict[int, str], windows: dict[int, Any], pad: str
) -> tuple[list[str], list[str]]:
    """(lines reading every path of ``tree`` below ``node``, the variables they set). A leaf
    of the tree is keyed None and holds the id of its path."""
    lines: list[str] = []
    assigned: list[str] = []
    for n, (key, sub) in enumerate(tree.items()):
        get = f"{node}.get({key!r})"
        if None in sub:
            v = var[sub[None]]
            lines.append(f"{pad}{v} = {get}")
            lines += _key_part(v, windows[sub[None]], pad)
            assigned.append(v)
        children = {k: c for k, c in sub.items() if k is not None}
        if children:
            child = f"{node}_{n}"
            lines.append(f"{pad}{child} = {get}")
            inner, inner_vars = _fetch(children, child, var, windows, pad + "    ")
            lines.append(f"{pad}if isinstance({child}, dict):")
            lines += inner
            lines.append(f"{pad}else:")
            lines.append(f"{pad}    {' = '.join(inner_vars)} = None")
            assigned += inner_vars
    return lines, assigned


def bucket_code(
    groups: Sequence[Group],
    field_tests: Iterable[FieldTest],
    always: Matched,
    env: dict[str, Any],
    name: str,
    pad: str,
    limit: int = MEMO_LIMIT,
) -> tuple[list[str], list[dict[Any, Matched]]]:
    """Lines matching one event type: each field read once, one memo look-up per group, the
    groups' answers joined (a test is in one group only). Their globals go into ``env``,
    named after ``name``; ``always`` are the tests that read nothing. A key part that cannot
    be hashed (a dict) raises TypeError, for the caller to match that event without memos.
    Returns the lines and the memos (for tests)."""
    by_path: dict[tuple[str, ...], list[FieldTest]] = {}
    for test in field_tests:
        by_path.setdefault(test.path, []).append(test)
    paths = sorted({p for g in groups for p in g.paths})
    number = {p: n for n, p in enumerate(paths)}
    windows = {number[p]: _url_window(by_path.get(p, ())) for p in paths}
    tree: dict[Any, Any] = {}
    for path in paths:
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[None] = number[path]
    lines, _ = _fetch(tree, "event", {n: f"v{n}" for n in number.values()}, windows, pad)
    memos = []
    keys = []
    for n, group in enumerate(groups):
        urls = tuple(i for i, p in enumerate(group.paths) if windows[number[p]] is not None)
        memo, fill = _filler(group, urls, limit)
        memos.append(memo)
        env[f"{name}_M{n}"], env[f"{name}_F{n}"] = memo, fill
        parts = [f"v{number[p]}" for p in group.paths]
        keys.append(parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")")
    lead = []
    if always:
        env[f"{name}_ALWAYS"] = always
        lead.append(f"{name}_ALWAYS")
    # All hits (the steady state): one expression. A miss raises KeyError and takes the
    # longer way, which fills the memos it misses.
    hits = " + ".join(lead + [f"{name}_M{n}[{key}]" for n, key in enumerate(keys)])
    lines += [
        f"{pad}try:",
        f"{pad}    return {hits or '()'}",
        f"{pad}except KeyError:",
        f"{pad}    pass",
    ]
    for n, key in enumerate(keys):
        lines += [
            f"{pad}k = {key}",
            f"{pad}h{n} = {name}_M{n}.get(k)",
            f"{pad}if h{n} is None:",
            f"{pad}    h{n} = {name}_F{n}(event, k)",
        ]
    lines.append(f"{pad}return " + " + ".join(lead + [f"h{n}" for n in range(len(keys))]))
    return lines, memos
