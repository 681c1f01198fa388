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
from dataclasses import dataclass
from typing import Any

from segment_rules.canonical import predicate_form
from segment_rules.event_memo import LIST, MEMO_LIMIT, Group, Matched, bucket_code
from segment_rules.event_tests import Event, EventTest, compile_predicate, url_parts
from segment_rules.fast_match import FAST_LIMIT, fast_matcher
from segment_rules.model import All, FieldTest, Not, Predicate

# Hits of one lookup: the tests the anchor decides alone, and (test id, what else must hold).
# Tests sharing one remaining check are grouped, so the check runs once for all of them.
Hits = tuple[tuple[str, ...], tuple[tuple[EventTest, tuple[str, ...]], ...]]
_Building = list[tuple[str, EventTest | None]]
Collect = Callable[[Event, list[str]], bool]
_HASHABLE = (str, int, float, bool)
# Few distinct values, so an anchor there finds many candidates: the last choice.
_SELECTIVITY_RANK = {("geo", "country"): 2, ("type",): 2, ("geo", "region"): 1}
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
        self.groups: dict[tuple[tuple[str, ...], str], dict[Any, _Building]] = {}
        self.always: list[str] = []
        self.residual: list[tuple[str, EventTest]] = []
        self.checks: dict[str, EventTest] = {}

    def add(self, test_id: str, conjuncts: list[Predicate]) -> None:
        anchors = [c for c in conjuncts if isinstance(c, FieldTest) and c.op in _ANCHOR_OPS]
        if not anchors:
            if conjuncts:
                self.residual.append((test_id, compile_predicate(All(tuple(conjuncts)))))
            else:
                self.always.append(test_id)
            return
        anchor = min(
            anchors, key=lambda a: (_SELECTIVITY_RANK.get(a.path, 0), len(_anchor_keys(a)[1]))
        )
        rest = [c for c in conjuncts if c is not anchor]
        check = self._check(rest) if rest else None
        mode, keys = _anchor_keys(anchor)
        table = self.groups.setdefault((anchor.path, mode), {})
        for key in keys:
            table.setdefault(key, []).append((test_id, check))

    def _check(self, rest: list[Predicate]) -> EventTest:
        """One compiled function per distinct remaining check (shared across tests)."""
        key = repr([predicate_form(p) for p in rest])
        check = self.checks.get(key)
        if check is None:
            check = self.checks[key] = compile_predicate(All(tuple(rest)))
        return check

    def compile(self) -> Callable[[Event], list[str]]:
        groups = [
            (path, mode, {key: _freeze(hits) for key, hits in table.items()})
            for (path, mode), table in self.groups.items()
        ]
        return _generate(groups, tuple(self.always), tuple(self.residual))


def _freeze(hits: _Building) -> Hits:
    return _merge(
        [
            (
                tuple(t for t, c in hits if c is None),
                tuple((c, (t,)) for t, c in hits if c is not None),
            )
        ]
    )


def _merge(found: list[Hits]) -> Hits:
    plain = tuple(dict.fromkeys(t for hits in found for t in hits[0]))
    by_check: dict[EventTest, dict[str, None]] = {}
    for hits in found:
        for check, test_ids in hits[1]:
            by_check.setdefault(check, {}).update(dict.fromkeys(test_ids))
    return (plain, tuple((check, tuple(ids)) for check, ids in by_check.items()))


def _category_keys(v: str) -> list[str]:
    """'a/b/c' -> 'a', 'a/b', 'a/b/c': the paths an 'under' anchor may name."""
    keys = []
    cut = v.find("/")
    while cut > 0:
        keys.append(v[:cut])
        cut = v.find("/", cut + 1)
    keys.append(v)
    return keys


def _domain_keys(host: str) -> list[str]:
    """'a.b.example' -> itself, 'b.example', 'example'."""
    keys = [host]
    while (dot := host.find(".")) >= 0:
        host = host[dot + 1 :]
        keys.append(host)
    return keys


_NOTHING: Hits = ((), ())
_MEMO_LIMIT = 1 << 16


def _netloc_host(netloc: str) -> str:
    return url_parts("http://" + netloc)[0]


def _memo(
    table: dict[Any, Hits], keys_of: Callable[[Any], list[Any]]
) -> tuple[dict[Any, Hits], Callable[[Any], Hits]]:
    """(memo, fill): value -> the hits of all its keys, merged once per distinct value
    (values repeat: categories, hosts). The memo is dropped when it grows past its limit."""
    memo: dict[Any, Hits] = {}

    def fill(value: Any) -> Hits:
        found = [h for k in keys_of(value) if (h := table.get(k)) is not None]
        hits = _merge(found) if found else _NOTHING
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[value] = hits
        return hits

    return memo, fill


def _url_memos(
    table: dict[Any, Hits], suffixes: bool
) -> tuple[dict[Any, Hits], Callable[[Any], Hits], Callable[[str], Hits]]:
    """For a host anchor: (memo by the text between '://' and the first '/', its filler,
    lookup by host for URLs of other shapes)."""

    def expand(host: str) -> list[str]:
        return _domain_keys(host) if suffixes else [host]

    def from_netloc(netloc: str) -> list[str]:
        return expand(_netloc_host(netloc))

    memo, fill = _memo(table, from_netloc)
    slow_memo, slow_fill = _memo(table, expand)

    def by_host(host: str) -> Hits:
        hits = slow_memo.get(host)
        return slow_fill(host) if hits is None else hits

    return memo, fill, by_host


# The matcher of one bucket is generated Python: one function with every anchored field's
# lookup inlined, because per-field function calls were most of the cost of an event.
_EMIT = """
{pad}if h[0]:
{pad}    out.extend(h[0])
{pad}for c, ts in h[1]:
{pad}    if c(event):
{pad}        out.extend(ts)"""
_LOOKUP = {
    # v -> h (hits or None); may `continue`-skip values that cannot be keys.
    "eq": "h = M{n}.get(v) if isinstance(v, H) else None",
    "memo": "h = M{n}.get(v) if type(v) in T{n} else None\n"
    "{pad}if h is None and type(v) in T{n}:\n{pad}    h = F{n}(v)",
    "url": "h = None\n"
    "{pad}if type(v) is str:\n"
    "{pad}    s = 8 if v.startswith('https://') else 7 if v.startswith('http://') else 0\n"
    "{pad}    if s:\n"
    "{pad}        e = v.find('/', s)\n"
    "{pad}        k = v[s:] if e < 0 else v[s:e]\n"
    "{pad}        h = M{n}.get(k)\n"
    "{pad}        if h is None:\n"
    "{pad}            h = F{n}(k)\n"
    "{pad}    else:\n"
    "{pad}        h = S{n}(url_parts(v)[0])",
}


def _generate(
    groups: list[tuple[tuple[str, ...], str, dict[Any, Hits]]],
    always: tuple[str, ...],
    residual: tuple[tuple[str, EventTest], ...],
) -> Callable[[Event], list[str]]:
    env: dict[str, Any] = {"H": _HASHABLE, "url_parts": url_parts, "RESIDUAL": residual}
    lines = ["def match(event):", f"    out = {list(always)!r}", "    rep = False"]
    for n, (path, mode, table) in enumerate(groups):
        kind = "eq"
        if mode == "eq":
            env[f"M{n}"] = table
        elif mode in ("iab", "under"):
            kind = "memo"
            if mode == "iab":
                env[f"T{n}"] = (str, int)  # ids as text or numbers, never true/false
                env[f"M{n}"], env[f"F{n}"] = _memo(table, lambda v: [str(v)])
            else:
                env[f"T{n}"] = (str,)
                env[f"M{n}"], env[f"F{n}"] = _memo(table, _category_keys)
        else:
            kind = "url"
            env[f"M{n}"], env[f"F{n}"], env[f"S{n}"] = _url_memos(table, mode == "domain")
        lines.append("    raw = event")
        for key in path:
            lines.append(f"    raw = raw.get({key!r}) if type(raw) is dict else None")
        lookup = _LOOKUP[kind]
        lines += [
            "    if raw is not None:",
            "        if type(raw) is list:",
            "            if len(raw) > 1:",
            "                rep = True",
            "            for v in raw:",
            "                " + lookup.format(n=n, pad=" " * 16),
            "                if h is not None:" + _EMIT.format(pad=" " * 20),
            "        else:",
            "            v = raw",
            "            " + lookup.format(n=n, pad=" " * 12),
            "            if h is not None:" + _EMIT.format(pad=" " * 16),
        ]
    if residual:
        lines += [
            "    for t, c in RESIDUAL:",
            "        if c(event):",
            "            out.append(t)",
        ]
    lines.append("    return list(dict.fromkeys(out)) if rep else out")
    exec(compile("\n".join(lines), "<segment_rules.event_index>", "exec"), env)
    match: Callable[[Event], list[str]] = env["match"]
    return match


def _field_tests(pred: Predicate) -> list[FieldTest]:
    if isinstance(pred, FieldTest):
        return [pred]
    if isinstance(pred, Not):
        return _field_tests(pred.part)
    return [t for part in pred.parts for t in _field_tests(part)]


def _indexed(entries: list[tuple[str, list[Predicate]]]) -> Callable[[Event], list[str]]:
    bucket = _Bucket()
    for test_id, conjuncts in entries:
        bucket.add(test_id, conjuncts)
    return bucket.compile()


@dataclass(frozen=True)
class Branch:
    """One event type's tests: grouped by the fields they read, each group indexed."""

    groups: tuple[Group, ...]
    # Per group, its (test id, conjuncts) entries: what decides whether it is elementwise.
    entries: tuple[tuple[tuple[str, list[Predicate]], ...], ...]
    field_tests: tuple[FieldTest, ...]
    always: tuple[str, ...]


def _branch(entries: list[tuple[str, list[Predicate]]]) -> Branch:
    by_paths: dict[tuple[tuple[str, ...], ...], list[tuple[str, list[Predicate]]]] = {}
    always: list[str] = []
    field_tests: list[FieldTest] = []
    for test_id, conjuncts in entries:
        if not conjuncts:
            always.append(test_id)
            continue
        found = [t for c in conjuncts for t in _field_tests(c)]
        field_tests += found
        paths = tuple(sorted({t.path for t in found}))
        by_paths.setdefault(paths, []).append((test_id, conjuncts))
    return Branch(
        groups=tuple(Group(paths, _indexed(group)) for paths, group in by_paths.items()),
        entries=tuple(tuple(group) for group in by_paths.values()),
        field_tests=tuple(field_tests),
        always=tuple(dict.fromkeys(always)),
    )


def _type_code(
    branch: Branch, env: dict[str, Any], name: str, limit: int
) -> tuple[list[str], list[dict[Any, Matched]]]:
    """The lines matching one event type: each group memoised (segment_rules.event_memo)."""
    pad = " " * 12
    return bucket_code(branch.groups, branch.field_tests, branch.always, env, name, pad, limit)


class EventIndex:
    """``match(event)``: the ids of the tests the event passes, each once.

    One generated function: the event's type picks a branch (tests that require another
    type are never looked at), the branch reads the fields its tests read and answers from
    memos; an event whose key cannot be hashed takes the indexed matchers directly.
    """

    def __init__(
        self,
        tests: Mapping[str, Predicate],
        memo_limit: int = MEMO_LIMIT,
        *,
        accelerate: bool = True,
        fast_limit: int = FAST_LIMIT,
    ) -> None:
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
        self.memos: list[dict[Any, Matched]] = []
        branches: dict[str, Branch] = {}
        env: dict[str, Any] = {
            "L": LIST,
            "SCAN": [(test_id, compile_predicate(pred)) for test_id, pred in tests.items()],
            "SLOW": {name: _indexed(entries + untyped) for name, entries in typed.items()},
            "SLOW_DEFAULT": _indexed(untyped),
        }
        lines = ["def match(event):", "    kind = event.get('type')", "    try:"]
        # Types with more tests first: the branch test is one string comparison each.
        order = sorted(typed, key=lambda k: -len(typed[k]))
        for n, name in enumerate(order):
            lines.append(f"        {'if' if n == 0 else 'elif'} kind == {name!r}:")
            branches[name] = _branch(typed[name] + untyped)
            code, memos = _type_code(branches[name], env, f"B{n}", memo_limit)
            lines += code
            self.memos += memos
        lines.append(f"        {'elif' if order else 'if'} kind is None or type(kind) is str:")
        default = _branch(untyped)
        code, memos = _type_code(default, env, "D", memo_limit)
        lines += code
        self.memos += memos
        lines += [
            "    except TypeError:  # a key part that cannot be hashed (a dict): no memo",
            "        pass",
            "    if type(kind) is str:",
            "        return tuple(SLOW.get(kind, SLOW_DEFAULT)(event))",
            "    if kind is None:",
            "        return tuple(SLOW_DEFAULT(event))",
            "    # Not an event of format v1 (a list or a number as type): test everything.",
            "    return tuple(test_id for test_id, check in SCAN if check(event))",
        ]
        exec(compile("\n".join(lines), "<segment_rules.event_index>", "exec"), env)
        # The generated Python, and the compiled matcher in front of it when built
        # (segment_rules.fast_match): both give the same answers, the second faster.
        self.python_match: Callable[[Event], Matched] = env["match"]
        self.match: Callable[[Event], Matched] = self.python_match
        if accelerate:
            self.match = fast_matcher(branches, default, self.python_match, fast_limit)
